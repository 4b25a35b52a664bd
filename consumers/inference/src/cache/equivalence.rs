//! Whether an earlier question's answer also answers a new one (pure). Embedding
//! similarity alone cannot tell: MiniLM scores a question and its negation about 0.85 and
//! a question with another number or date about 0.90, as high as many paraphrases. So a
//! candidate above the similarity threshold must also say the same thing word for word,
//! up to what never changes an answer:
//!
//! - the same negations (not, never, without, n't …), counted;
//! - the same numbers, in digits or words (two = 2, 15 % = 15 percent);
//! - the same content words: every word that is not a function word (articles, pronouns,
//!   auxiliaries, common prepositions, polite filler), up to a plural `s` and one typo in
//!   a word of five letters or more; names, identifiers and numbers must match exactly;
//! - the same question word (how, when, where, who, why; what and which are alike);
//! - the same order of content words where order carries meaning (to, from, than, into,
//!   versus: "dollars to euros" is not "euros to dollars").
//!
//! What passes is a near repeat: other case, punctuation, contractions, filler, function
//! words, word order, a typo. What a synonym changes ("bigger" for "larger") is refused:
//! a miss costs one model call, a false hit a wrong answer. tests/cache_eval measures both
//! per category.

/// Why a candidate's answer does not answer the new question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// Embedding similarity under the threshold.
    Dissimilar,
    /// One is negated where the other is not (or differently often).
    Negation,
    /// Other numbers, amounts, dates or years.
    Quantity,
    /// Other content words (an entity, a scope, a verb), or another question word.
    Wording,
    /// The same words in an order that changes the meaning.
    Order,
}

impl Refusal {
    /// As metrics and logs name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dissimilar => "dissimilar",
            Self::Negation => "negation",
            Self::Quantity => "quantity",
            Self::Wording => "wording",
            Self::Order => "order",
        }
    }
}

/// Whether `cached` (a question answered before) and `asked` are the same question:
/// `similarity` is the cosine of their embeddings.
pub fn equivalent(asked: &str, cached: &str, similarity: f32, threshold: f32) -> Result<(), Refusal> {
    if similarity < threshold {
        return Err(Refusal::Dissimilar);
    }
    let (asked, cached) = (Words::of(asked), Words::of(cached));
    if asked.negations != cached.negations {
        return Err(Refusal::Negation);
    }
    if asked.numbers != cached.numbers {
        return Err(Refusal::Quantity);
    }
    if asked.question_words != cached.question_words || !same_content(&asked.content, &cached.content) {
        return Err(Refusal::Wording);
    }
    if (asked.directional || cached.directional) && !same_order(&asked.content, &cached.content) {
        return Err(Refusal::Order);
    }
    Ok(())
}

/// Function words: they change how a question is put, not what it asks. Quantifiers,
/// comparisons and directions (all, only, more, before, after, first, last …) are not
/// among them.
const FUNCTION_WORDS: &[&str] = &[
    "a", "about", "am", "an", "and", "are", "as", "at", "be", "been", "being", "can", "could", "did", "do", "does",
    "doing", "during", "for", "from", "had", "has", "have", "he", "her", "hers", "him", "his", "i", "in", "into", "is",
    "it", "its", "itself", "let", "ll", "may", "me", "might", "mine", "my", "of", "on", "onto", "our", "ours", "re",
    "s", "she", "should", "that", "the", "their", "them", "there", "these", "they", "this", "those", "to", "toward",
    "towards", "us", "ve", "was", "we", "were", "what", "which", "will", "with", "would", "you", "your", "yours", "d",
    "m", // Polite filler.
    "please", "kindly", "tell", "know", "exactly", "actually", "just", "really", "way", "hi", "hello", "hey", "thanks",
    "thank", "able", "possible", "many", "much",
];

/// Words that make the order of the others matter.
const DIRECTIONAL: &[&str] = &["to", "from", "into", "than", "vs", "versus", "onto", "toward", "towards"];

/// Question words that change what is asked (what and which ask alike and count as none).
const QUESTION_WORDS: &[&str] = &["how", "when", "where", "who", "whom", "whose", "why"];

const NEGATIONS: &[&str] = &[
    "not",
    "no",
    "never",
    "none",
    "nobody",
    "nothing",
    "nowhere",
    "neither",
    "nor",
    "without",
    "cannot",
    "except",
    "unless",
    "excluding",
];

const NUMBER_WORDS: &[(&str, &str)] = &[
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
    ("eleven", "11"),
    ("twelve", "12"),
    ("dozen", "12"),
    ("thirteen", "13"),
    ("fourteen", "14"),
    ("fifteen", "15"),
    ("sixteen", "16"),
    ("seventeen", "17"),
    ("eighteen", "18"),
    ("nineteen", "19"),
    ("twenty", "20"),
    ("thirty", "30"),
    ("forty", "40"),
    ("fifty", "50"),
    ("sixty", "60"),
    ("seventy", "70"),
    ("eighty", "80"),
    ("ninety", "90"),
    ("hundred", "100"),
    ("thousand", "1000"),
    ("million", "1000000"),
    ("billion", "1000000000"),
    ("half", "0.5"),
    ("twice", "x2"),
    ("double", "x2"),
    ("triple", "x3"),
];

/// A question reduced to what its answer depends on.
#[derive(Debug, Default)]
struct Words {
    negations: usize,
    /// Numbers in digits, sorted.
    numbers: Vec<String>,
    question_words: Vec<&'static str>,
    /// Content words in order: (word, whether it must match exactly).
    content: Vec<(String, bool)>,
    directional: bool,
}

impl Words {
    fn of(text: &str) -> Self {
        let text = text.replace(['\u{2019}', '\u{2018}'], "'").replace('%', " percent ").to_lowercase();
        // "at all" only insists; "all" alone is a quantifier.
        let text = text.replace(" at all", " ");
        let mut words = Self::default();
        for token in text.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '.')) {
            let token = token.trim_matches(|c: char| c == '\'' || c == '.');
            if token.is_empty() {
                continue;
            }
            if token.ends_with("n't") || NEGATIONS.contains(&token) {
                words.negations += 1;
                continue;
            }
            // "what's" and "france's" are "what" and "france".
            let token = token.split('\'').next().unwrap_or(token);
            if let Some(number) = number(token) {
                words.numbers.push(number);
                continue;
            }
            // A dotted name splits into its words (node.js: node, js).
            for part in token.split('.').filter(|p| !p.is_empty()) {
                words.add(part);
            }
        }
        words.numbers.sort();
        words.question_words.sort_unstable();
        words.question_words.dedup();
        words
    }

    fn add(&mut self, word: &str) {
        if DIRECTIONAL.contains(&word) {
            self.directional = true;
        }
        if let Some(question) = QUESTION_WORDS.iter().find(|q| **q == word) {
            self.question_words.push(question);
        } else if !FUNCTION_WORDS.contains(&word) {
            // Identifiers (e1234, x200) match exactly; so do words too short for a typo.
            let exact = word.chars().any(|c| c.is_ascii_digit()) || word.chars().count() < 5;
            self.content.push((singular(word).to_owned(), exact));
        }
    }
}

/// A number in digits (`1,000` and `1000` alike), for a numeral or a number word.
fn number(token: &str) -> Option<String> {
    if let Some((_, digits)) = NUMBER_WORDS.iter().find(|(word, _)| *word == token) {
        return Some((*digits).to_owned());
    }
    let digits = token.replace(',', "");
    (!digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit() || c == '.') && digits.parse::<f64>().is_ok())
        .then(|| digits.trim_start_matches('0').to_owned())
}

/// `word` without a plural `s` (not `ss`, not in words of three letters or fewer).
fn singular(word: &str) -> &str {
    match word.strip_suffix('s') {
        Some(stem) if stem.len() >= 3 && !stem.ends_with('s') => stem,
        _ => word,
    }
}

/// Whether both hold the same content words, each either equal or (where neither must
/// match exactly) one typo apart.
fn same_content(a: &[(String, bool)], b: &[(String, bool)]) -> bool {
    let mut unmatched: Vec<&(String, bool)> = b.iter().collect();
    let mut leftover = Vec::new();
    for word in a {
        match unmatched.iter().position(|other| other.0 == word.0) {
            Some(at) => {
                unmatched.swap_remove(at);
            }
            None => leftover.push(word),
        }
    }
    // A repeated word counts once: "the admin of the admin group" asks what "admin group" does.
    unmatched.retain(|word| !a.iter().any(|other| other.0 == word.0));
    leftover.retain(|word| !b.iter().any(|other| other.0 == word.0));
    if leftover.len() != unmatched.len() {
        return false;
    }
    leftover.iter().all(|word| {
        !word.1
            && match unmatched.iter().position(|other| !other.1 && one_edit_apart(&word.0, &other.0)) {
                Some(at) => {
                    unmatched.swap_remove(at);
                    true
                }
                None => false,
            }
    })
}

/// Whether the content words come in the same order (each first occurrence, typos aside).
fn same_order(a: &[(String, bool)], b: &[(String, bool)]) -> bool {
    let (a, b) = (first_occurrences(a), first_occurrences(b));
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x == y || one_edit_apart(x, y))
}

/// Each word once, where it first occurs.
fn first_occurrences(words: &[(String, bool)]) -> Vec<&str> {
    let mut seen: Vec<&str> = Vec::new();
    for (word, _) in words {
        if !seen.contains(&word.as_str()) {
            seen.push(word);
        }
    }
    seen
}

/// Whether `a` becomes `b` by one insertion, deletion, substitution or swap of neighbours.
fn one_edit_apart(a: &str, b: &str) -> bool {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let (short, long) = if a.len() <= b.len() { (&a, &b) } else { (&b, &a) };
    if long.len() - short.len() > 1 {
        return false;
    }
    let prefix = short.iter().zip(long.iter()).take_while(|(x, y)| x == y).count();
    if short.len() == long.len() {
        let rest = |from: usize| short[from..] == long[from..];
        prefix == short.len()
            || rest(prefix + 1)
            || (prefix + 1 < short.len()
                && short[prefix] == long[prefix + 1]
                && short[prefix + 1] == long[prefix]
                && rest(prefix + 2))
    } else {
        short[prefix..] == long[prefix + 1..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(a: &str, b: &str) -> Result<(), Refusal> {
        equivalent(a, b, 1.0, 0.5)
    }

    #[test]
    fn near_repeats_pass() {
        assert_eq!(check("How do I reset my password?", "how can i reset my pasword"), Ok(()));
        assert_eq!(check("What is the capital of France?", "What's France's capital?"), Ok(()));
        assert_eq!(check("What is 15 percent of 80?", "What's 15% of 80?"), Ok(()));
        assert_eq!(check("How do I merge two PDF files?", "How do I merge 2 PDF files?"), Ok(()));
        assert_eq!(check("Can dogs eat grapes?", "can dogs eat grapes at all??"), Ok(()));
    }

    #[test]
    fn flips_are_refused_whatever_the_similarity() {
        assert_eq!(check("Is it safe?", "Is it not safe?"), Err(Refusal::Negation));
        assert_eq!(check("Why can't dogs eat grapes?", "Why can dogs eat grapes?"), Err(Refusal::Negation));
        assert_eq!(check("Who won in 2014?", "Who won in 2018?"), Err(Refusal::Quantity));
        assert_eq!(check("Merge two files", "Merge three files"), Err(Refusal::Quantity));
        assert_eq!(check("Capital of France?", "Capital of Germany?"), Err(Refusal::Wording));
        assert_eq!(check("Fix error E1234", "Fix error E1243"), Err(Refusal::Wording));
        assert_eq!(check("When does it open?", "Where does it open?"), Err(Refusal::Wording));
        assert_eq!(check("Convert 100 dollars to euros", "Convert 100 euros to dollars"), Err(Refusal::Order));
        assert_eq!(check("a b", "a b"), Ok(()));
        assert_eq!(equivalent("same", "same", 0.79, 0.8), Err(Refusal::Dissimilar));
    }

    #[test]
    fn one_edit_means_one() {
        assert!(one_edit_apart("password", "pasword"));
        assert!(one_edit_apart("account", "acount"));
        assert!(one_edit_apart("receive", "recieve"));
        assert!(one_edit_apart("colour", "colour"));
        assert!(!one_edit_apart("france", "frankfurt"));
        assert!(!one_edit_apart("recipe", "receipt"));
    }
}
