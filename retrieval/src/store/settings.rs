//! Where the vectors live, how they are indexed and how a search ranks them.

use clap::{Args, ValueEnum};

use crate::fusion::SearchMode;

/// The approximate index Milvus builds over the vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IndexKind {
    /// Graph index: the best latency/recall trade-off for in-memory collections.
    Hnsw,
    /// HNSW over vectors quantized to one byte per dimension (SQ8): a quarter of the
    /// vector memory, a little recall.
    HnswSq,
    /// Inverted file over k-means clusters: less memory, needs enough rows to train.
    IvfFlat,
    /// IVF over SQ8-quantized vectors: the smallest index here, the lowest recall.
    IvfSq8,
    /// Exact search: the reference for recall, linear in the collection size.
    Flat,
}

/// Where the vectors live and how they are indexed and searched.
#[derive(Debug, Clone, Args)]
pub struct MilvusSettings {
    /// Milvus (or Milvus Lite) gRPC endpoint.
    #[arg(long, global = true, env = "PARLEY_MILVUS_URL", default_value = "http://127.0.0.1:19530")]
    pub milvus_url: String,

    /// `user:password` or API key of a secured cluster.
    #[arg(long, global = true, env = "PARLEY_MILVUS_TOKEN", hide_env_values = true)]
    pub milvus_token: Option<String>,

    /// The Milvus collection of Parley's vectors.
    #[arg(long, global = true, env = "PARLEY_MILVUS_COLLECTION", default_value = "parley_knowledge",
          value_parser = parse_collection_name)]
    pub milvus_collection: String,

    /// Index built when the collection is created (an existing collection keeps its own).
    /// The default, HNSW_SQ, was chosen by measurement at a million vectors (docs/knowledge.md).
    #[arg(long, global = true, env = "PARLEY_MILVUS_INDEX", value_enum, default_value = "hnsw-sq")]
    pub milvus_index: IndexKind,

    /// Shards (write channels) of a new collection; 0: the server's default (1). Set it
    /// when the collection is created: it cannot change afterwards.
    #[arg(long, global = true, env = "PARLEY_MILVUS_SHARDS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=64))]
    pub milvus_shards: u16,

    /// Partitions the owner partition key hashes owners onto in a new collection; 0: the
    /// server's default (64). Fixed at creation. Milvus Lite always makes 16.
    #[arg(long, global = true, env = "PARLEY_MILVUS_PARTITIONS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=4096))]
    pub milvus_partitions: u16,

    /// HNSW and HNSW_SQ: links per node.
    #[arg(long, global = true, env = "PARLEY_MILVUS_HNSW_M", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=2048))]
    pub milvus_hnsw_m: u32,

    /// HNSW and HNSW_SQ: candidate list size while building.
    #[arg(long, global = true, env = "PARLEY_MILVUS_HNSW_EF_CONSTRUCTION", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(8..=65536))]
    pub milvus_hnsw_ef_construction: u32,

    /// HNSW and HNSW_SQ: candidate list size while searching (at least top-k); higher is slower and more exact.
    #[arg(long, global = true, env = "PARLEY_MILVUS_SEARCH_EF", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub milvus_search_ef: u32,

    /// IVF_FLAT and IVF_SQ8: clusters built.
    #[arg(long, global = true, env = "PARLEY_MILVUS_IVF_NLIST", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub milvus_ivf_nlist: u32,
    /// Clusters an IVF index searches.
    #[arg(long, global = true, env = "PARLEY_MILVUS_IVF_NPROBE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub milvus_ivf_nprobe: u32,

    /// Which retrievers a search asks: vectors and BM25 keywords fused by reciprocal rank
    /// (hybrid), or one of them alone.
    #[arg(long, global = true, env = "PARLEY_SEARCH_MODE", value_enum, default_value = "hybrid")]
    pub search_mode: SearchMode,

    /// Reciprocal rank fusion's constant k: a hit scores Σ 1/(k + rank). Smaller favours
    /// the top of either list; larger favours hits both lists found.
    #[arg(long, global = true, env = "PARLEY_SEARCH_RRF_K", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub search_rrf_k: u32,

    /// Hits each retriever contributes before fusion (at least the number asked for).
    /// Longer lists let hits both lists rank low outrank one list's confident first hit
    /// (docs/benchmarks.md, "Retrieval quality").
    #[arg(long, global = true, env = "PARLEY_SEARCH_CANDIDATES", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub search_candidates: u32,
}

fn parse_collection_name(value: &str) -> Result<String, String> {
    let legal = value.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && value.len() <= 255;
    if legal {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?}: letters, digits and _ only, not starting with a digit"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_names_are_checked() {
        assert!(parse_collection_name("parley_knowledge").is_ok());
        assert!(parse_collection_name("9lives").is_err());
        assert!(parse_collection_name("a-b").unwrap_err().contains("a-b"));
    }

    #[test]
    fn shards_and_partitions_out_of_range_are_refused_by_name() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            milvus: MilvusSettings,
        }
        let parse = |args: &[&str]| <Cli as clap::Parser>::try_parse_from([&["test"], args].concat());
        let settings = parse(&["--milvus-shards", "8", "--milvus-partitions", "1024"]).unwrap().milvus;
        assert_eq!((settings.milvus_shards, settings.milvus_partitions), (8, 1024));
        let too_many_shards = parse(&["--milvus-shards", "65"]).err().unwrap().to_string();
        assert!(too_many_shards.contains("--milvus-shards"), "{too_many_shards}");
        let too_many_partitions = parse(&["--milvus-partitions", "4097"]).err().unwrap().to_string();
        assert!(too_many_partitions.contains("--milvus-partitions"), "{too_many_partitions}");
    }

    #[test]
    fn index_kinds_have_the_documented_names() {
        let names: Vec<String> = IndexKind::value_variants()
            .iter()
            .filter_map(|kind| kind.to_possible_value().map(|v| v.get_name().to_owned()))
            .collect();
        assert_eq!(names, ["hnsw", "hnsw-sq", "ivf-flat", "ivf-sq8", "flat"]);
    }
}
