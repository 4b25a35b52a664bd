//! Hybrid ranking: the vector search's and the keyword search's lists fused by reciprocal
//! rank (RRF, Cormack et al. 2009). Pure: no I/O, so each rule is tested here.
//!
//! RRF scores a hit `Σ 1 / (k + rank)` over the lists it appears in (rank 1 = first), so a
//! hit near the top of either list ranks high and one found by both ranks higher, without
//! comparing a cosine with a BM25 score (their scales have nothing in common). Fusing here
//! rather than with Milvus's RRF ranker keeps each side's own score on the hit: the cosine
//! (computed for keyword hits too) is what inference's relevance floor reads, and an audit
//! sees why a hit was chosen.

use std::collections::HashMap;

use crate::store::Hit;

/// Which retrievers a search asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchMode {
    /// Vectors and BM25 keywords, fused by reciprocal rank.
    Hybrid,
    /// The embedding's nearest neighbours only.
    Vector,
    /// BM25 over the stored texts only.
    Keyword,
}

impl SearchMode {
    /// Whether the question must be embedded.
    pub fn uses_vectors(self) -> bool {
        matches!(self, Self::Hybrid | Self::Vector)
    }

    /// Whether the keyword index is searched.
    pub fn uses_keywords(self) -> bool {
        matches!(self, Self::Hybrid | Self::Keyword)
    }
}

/// The `limit` best of `vector_hits` and `keyword_hits` (each best first) by reciprocal rank
/// with constant `k`. A hit found by both keeps both sides' scores; its `score` becomes the
/// fused one. Ties keep the order of first appearance, vector list first.
pub fn reciprocal_rank_fusion(vector_hits: Vec<Hit>, keyword_hits: Vec<Hit>, k: u32, limit: usize) -> Vec<Hit> {
    let mut fused: Vec<Hit> = Vec::with_capacity(vector_hits.len() + keyword_hits.len());
    let mut position: HashMap<String, usize> = HashMap::new();
    for list in [vector_hits, keyword_hits] {
        for (rank, hit) in list.into_iter().enumerate() {
            let contribution = 1.0 / (f64::from(k) + rank as f64 + 1.0);
            match position.get(&hit.id) {
                Some(&at) => {
                    let existing = &mut fused[at];
                    existing.score += contribution as f32;
                    existing.similarity = existing.similarity.or(hit.similarity);
                    existing.keyword_score = existing.keyword_score.or(hit.keyword_score);
                }
                None => {
                    position.insert(hit.id.clone(), fused.len());
                    fused.push(Hit { score: contribution as f32, ..hit });
                }
            }
        }
    }
    // Stable: equal scores keep the order of first appearance.
    fused.sort_by(|a, b| b.score.total_cmp(&a.score));
    fused.truncate(limit);
    fused
}

#[cfg(test)]
mod tests {
    use parley_events::EventId;

    use super::*;
    use crate::filter::SourceKind;

    fn hit(id: &str, similarity: Option<f32>, keyword_score: Option<f32>) -> Hit {
        Hit {
            id: id.to_owned(),
            kind: SourceKind::Document,
            source_id: "doc".to_owned(),
            source_event_id: EventId::random(),
            position: 0,
            label: String::new(),
            text: id.to_owned(),
            score: similarity.or(keyword_score).unwrap_or(0.0),
            similarity,
            keyword_score,
        }
    }

    fn ids(hits: &[Hit]) -> Vec<&str> {
        hits.iter().map(|h| h.id.as_str()).collect()
    }

    #[test]
    fn a_hit_both_lists_found_outranks_hits_only_one_found() {
        let vectors = vec![hit("a", Some(0.9), None), hit("b", Some(0.8), None)];
        let keywords = vec![hit("c", None, Some(7.0)), hit("b", None, Some(5.0))];
        let fused = reciprocal_rank_fusion(vectors, keywords, 60, 10);
        assert_eq!(ids(&fused), ["b", "a", "c"]);
        // b keeps both sides' own scores, and its fused score is the sum of its two ranks'.
        assert_eq!((fused[0].similarity, fused[0].keyword_score), (Some(0.8), Some(5.0)));
        let expected = 1.0 / 62.0 + 1.0 / 62.0;
        assert!((f64::from(fused[0].score) - expected).abs() < 1e-6);
    }

    #[test]
    fn ties_keep_the_order_of_first_appearance() {
        let fused = reciprocal_rank_fusion(vec![hit("v1", Some(0.5), None)], vec![hit("k1", None, Some(3.0))], 60, 10);
        assert_eq!(ids(&fused), ["v1", "k1"]);
    }

    #[test]
    fn the_result_is_cut_at_the_limit() {
        let vectors = (0..5).map(|i| hit(&format!("v{i}"), Some(0.5), None)).collect();
        let keywords = (0..5).map(|i| hit(&format!("k{i}"), None, Some(1.0))).collect();
        let fused = reciprocal_rank_fusion(vectors, keywords, 60, 3);
        assert_eq!(ids(&fused), ["v0", "k0", "v1"]);
    }

    #[test]
    fn a_small_k_lets_the_top_of_one_list_beat_a_hit_both_lists_rank_low() {
        let vectors = vec![hit("top", Some(0.9), None), hit("x", None, None), hit("both", Some(0.4), None)];
        let keywords = vec![hit("y", None, Some(2.0)), hit("z", None, Some(2.0)), hit("both", None, Some(1.0))];
        // With k = 1: top = 1/2; both = 1/4 + 1/4 = 1/2 (a tie: first appearance wins).
        assert_eq!(ids(&reciprocal_rank_fusion(vectors.clone(), keywords.clone(), 1, 1)), ["top"]);
        // With k = 60 agreement matters more: both = 2/63 > top = 1/61.
        assert_eq!(ids(&reciprocal_rank_fusion(vectors, keywords, 60, 1)), ["both"]);
    }

    #[test]
    fn one_empty_list_keeps_the_other_in_order() {
        let fused =
            reciprocal_rank_fusion(Vec::new(), vec![hit("k1", None, Some(3.0)), hit("k2", None, Some(1.0))], 60, 10);
        assert_eq!(ids(&fused), ["k1", "k2"]);
    }
}
