//! Splits a document into chunks that fit the embedding model's window. Boundaries prefer
//! paragraphs, then sentences, then (for run-on text) any character; consecutive chunks
//! share up to `overlap` characters so a fact cut by a boundary is whole in one of them.

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// 0-based chunk number within the document.
    pub position: i64,
    /// The chunk's text (a slice of the document's, at paragraph or sentence ends).
    pub text: String,
}

/// Chunks of `text` of at most `max_chars` characters each (`overlap` < `max_chars`).
pub fn chunk_text(text: &str, max_chars: usize, overlap: usize) -> Vec<Chunk> {
    let max_chars = max_chars.max(1);
    let overlap = overlap.min(max_chars / 2);
    let pieces = pieces(text, max_chars);
    let mut chunks: Vec<String> = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut current_len = 0;
    for piece in pieces {
        let len = piece.chars().count();
        if current_len + len > max_chars && !current.is_empty() {
            chunks.push(current.concat());
            // Carry trailing pieces into the next chunk, up to `overlap` characters.
            let mut carried = Vec::new();
            let mut carried_len = 0;
            for previous in current.iter().rev() {
                let previous_len = previous.chars().count();
                if carried_len + previous_len > overlap || carried_len + previous_len + len > max_chars {
                    break;
                }
                carried.push(*previous);
                carried_len += previous_len;
            }
            carried.reverse();
            current = carried;
            current_len = carried_len;
        }
        current.push(piece);
        current_len += len;
    }
    if current.iter().any(|p| !p.trim().is_empty()) {
        chunks.push(current.concat());
    }
    chunks
        .into_iter()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .enumerate()
        .map(|(i, text)| Chunk { position: i64::try_from(i).unwrap_or(i64::MAX), text })
        .collect()
}

/// Splits `text` into pieces of at most `max_chars`, each keeping its trailing separator,
/// so that concatenating them gives `text` back.
fn pieces(text: &str, max_chars: usize) -> Vec<&str> {
    let mut out = Vec::new();
    for paragraph in split_after(text, "\n\n") {
        if paragraph.chars().count() <= max_chars {
            out.push(paragraph);
            continue;
        }
        for sentence in split_sentences(paragraph) {
            if sentence.chars().count() <= max_chars {
                out.push(sentence);
            } else {
                out.extend(split_chars(sentence, max_chars));
            }
        }
    }
    out
}

/// Pieces of `text` each ending with `separator` (the last one may not).
fn split_after<'a>(text: &'a str, separator: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(separator) {
        let (head, tail) = rest.split_at(at + separator.len());
        out.push(head);
        rest = tail;
    }
    if !rest.is_empty() {
        out.push(rest);
    }
    out
}

/// Sentences end after `.`, `!`, `?` or a line break followed by whitespace.
fn split_sentences(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let ends = matches!(c, '.' | '!' | '?' | '\n') && chars.peek().is_some_and(|(_, next)| next.is_whitespace());
        if ends {
            let end = i + c.len_utf8();
            // Take the following whitespace along, so pieces concatenate to the text.
            let mut end_ws = end;
            while let Some((j, w)) = chars.peek().copied() {
                if !w.is_whitespace() {
                    break;
                }
                end_ws = j + w.len_utf8();
                chars.next();
            }
            out.push(&text[start..end_ws]);
            start = end_ws;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

fn split_chars(text: &str, max_chars: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (count, (i, _)) in text.char_indices().enumerate() {
        if count > 0 && count % max_chars == 0 {
            out.push(&text[start..i]);
            start = i;
        }
    }
    out.push(&text[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_chunk() {
        assert_eq!(chunk_text("Kafka is a log.", 100, 10), vec![Chunk { position: 0, text: "Kafka is a log.".into() }]);
        assert!(chunk_text("   \n\n  ", 100, 10).is_empty());
    }

    #[test]
    fn paragraphs_are_packed_and_never_exceed_the_limit() {
        let text = (0..20).map(|i| format!("Paragraph {i} says something useful.")).collect::<Vec<_>>().join("\n\n");
        let chunks = chunk_text(&text, 120, 0);
        assert!(chunks.len() > 3);
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(chunk.text.chars().count() <= 120, "{chunk:?}");
            assert_eq!(chunk.position, i as i64);
        }
        // Without overlap every paragraph appears exactly once.
        let joined = chunks.iter().map(|c| c.text.as_str()).collect::<Vec<_>>().join("\n\n");
        assert_eq!(joined, text);
    }

    #[test]
    fn long_paragraphs_split_at_sentences_with_overlap() {
        let text = "First fact is here. Second fact is here. Third fact is here. Fourth fact is here.";
        let chunks = chunk_text(text, 45, 25);
        assert!(chunks.len() >= 2, "{chunks:?}");
        for pair in chunks.windows(2) {
            let last_sentence = pair[0].text.rsplit(". ").next().unwrap();
            assert!(pair[1].text.starts_with(last_sentence.trim_end_matches('.')), "overlap: {pair:?}");
        }
        assert!(chunks.iter().any(|c| c.text.contains("Fourth fact")));
    }

    #[test]
    fn run_on_text_is_cut_at_character_boundaries() {
        let text = "é".repeat(250);
        let chunks = chunk_text(&text, 100, 0);
        assert_eq!(chunks.iter().map(|c| c.text.chars().count()).collect::<Vec<_>>(), [100, 100, 50]);
    }
}
