//! Class weights: how much each class's examples count, for imbalanced data. One type and one
//! parser for both learners: the batch trainer resolves the weights once from its training
//! set's labels ([`ClassWeights::resolve`]), the stream learner from the running counts of the
//! labels it has learned so far ([`ClassWeights::stream_weight`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// How much each class's examples count. Written as text, in configs and snapshots alike:
/// `none`, `balanced`, or `class=weight,class=weight`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ClassWeights {
    /// Every example counts once.
    #[default]
    None,
    /// `n / (classes × n_c)`, as scikit-learn's `class_weight="balanced"`: rare classes count
    /// as much in total as common ones.
    Balanced,
    /// Given weights; classes not named weigh 1.
    Given(BTreeMap<String, f32>),
}

/// Why class weights cannot be read or used; the message names the class or the text at fault.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ClassWeightsError {
    #[error("{pair:?} is not class=weight (or use none, balanced)")]
    NotAPair { pair: String },
    #[error("the weight of {class:?} is not a number: {weight:?}")]
    NotANumber { class: String, weight: String },
    #[error("the weight of {class:?} must be finite and non-negative, got {weight}")]
    OutOfRange { class: String, weight: f32 },
    #[error("class weight for {class:?}, which is not a class of the data ({classes:?})")]
    UnknownClass { class: String, classes: Vec<String> },
}

impl std::str::FromStr for ClassWeights {
    type Err = ClassWeightsError;

    /// `none`, `balanced`, or `class=weight,class=weight`.
    fn from_str(s: &str) -> Result<ClassWeights, ClassWeightsError> {
        match s.trim() {
            "none" | "" => Ok(ClassWeights::None),
            "balanced" => Ok(ClassWeights::Balanced),
            list => list
                .split(',')
                .map(|pair| {
                    let (class, weight) =
                        pair.split_once('=').ok_or_else(|| ClassWeightsError::NotAPair { pair: pair.into() })?;
                    let number: f32 = weight
                        .trim()
                        .parse()
                        .map_err(|_| ClassWeightsError::NotANumber { class: class.into(), weight: weight.into() })?;
                    if !(number.is_finite() && number >= 0.0) {
                        return Err(ClassWeightsError::OutOfRange { class: class.into(), weight: number });
                    }
                    Ok((class.trim().to_string(), number))
                })
                .collect::<Result<_, _>>()
                .map(ClassWeights::Given),
        }
    }
}

/// The text [`FromStr`](std::str::FromStr) reads back as the same weights (f32's `Display` is
/// the shortest text that parses to the same bits).
impl fmt::Display for ClassWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClassWeights::None => f.write_str("none"),
            ClassWeights::Balanced => f.write_str("balanced"),
            ClassWeights::Given(given) => {
                let pairs: Vec<String> = given.iter().map(|(class, weight)| format!("{class}={weight}")).collect();
                f.write_str(&pairs.join(","))
            }
        }
    }
}

impl TryFrom<String> for ClassWeights {
    type Error = ClassWeightsError;

    fn try_from(text: String) -> Result<ClassWeights, ClassWeightsError> {
        text.parse()
    }
}

impl From<ClassWeights> for String {
    fn from(weights: ClassWeights) -> String {
        weights.to_string()
    }
}

/// The balanced weight of a class with `n_c` of `n` examples, `classes` classes having any:
/// computed in f64, so that the weight is the correctly rounded f32 of the formula on every
/// platform.
fn balanced(n: u64, classes: usize, n_c: u64) -> f32 {
    (n as f64 / (classes as f64 * n_c as f64)) as f32
}

impl ClassWeights {
    /// The weight of each class index, for `labels` (class indices) of the training set. A class
    /// without examples weighs 1 under `balanced` (it has no examples to weigh).
    pub fn resolve(&self, classes: &[String], labels: &[usize]) -> Result<Vec<f32>, ClassWeightsError> {
        match self {
            ClassWeights::None => Ok(vec![1.0; classes.len()]),
            ClassWeights::Balanced => {
                let mut counts = vec![0u64; classes.len()];
                labels.iter().for_each(|&l| counts[l] += 1);
                let present = counts.iter().filter(|&&c| c > 0).count().max(1);
                let n = labels.len() as u64;
                Ok(counts.iter().map(|&c| if c == 0 { 1.0 } else { balanced(n, present, c) }).collect())
            }
            ClassWeights::Given(given) => {
                if let Some(unknown) = self.unknown_class(classes) {
                    return Err(ClassWeightsError::UnknownClass { class: unknown.into(), classes: classes.to_vec() });
                }
                Ok(classes.iter().map(|c| given.get(c).copied().unwrap_or(1.0)).collect())
            }
        }
    }

    /// The first class the weights name that is not one of `classes`.
    pub fn unknown_class(&self, classes: &[String]) -> Option<&str> {
        match self {
            ClassWeights::Given(given) => given.keys().find(|k| !classes.contains(k)).map(String::as_str),
            _ => None,
        }
    }

    /// The weight, in a stream, of an example of class `label` (index `index`), where `counts`
    /// are the examples of each class index learned before it. Under `balanced` the counts
    /// include the example itself: the weight is then defined for the first example of a class
    /// (which has no earlier ones to divide by), and it is the batch formula applied to the
    /// stream so far, so that a stream replaying a fixed set ends at that set's batch weights.
    pub fn stream_weight(&self, label: &str, index: usize, counts: &[u64]) -> f32 {
        match self {
            ClassWeights::None => 1.0,
            ClassWeights::Given(given) => given.get(label).copied().unwrap_or(1.0),
            ClassWeights::Balanced => {
                let before = counts.get(index).copied().unwrap_or(0);
                let n = counts.iter().sum::<u64>() + 1;
                let seen = counts.iter().filter(|&&c| c > 0).count() + usize::from(before == 0);
                balanced(n, seen, before + 1)
            }
        }
    }

    /// The weight of an example of class `label` (index `index`) that `counts` already count:
    /// a replay of one learned before.
    pub fn counted_weight(&self, label: &str, index: usize, counts: &[u64]) -> f32 {
        match self {
            ClassWeights::Balanced => {
                let seen = counts.iter().filter(|&&c| c > 0).count();
                balanced(counts.iter().sum(), seen, counts[index].max(1))
            }
            _ => self.stream_weight(label, index, counts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_weights_parse_and_resolve() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let labels = [0, 0, 0, 1, 2, 2];
        assert_eq!("none".parse::<ClassWeights>().unwrap().resolve(&classes, &labels).unwrap(), vec![1.0; 3]);
        let balanced = "balanced".parse::<ClassWeights>().unwrap().resolve(&classes, &labels).unwrap();
        assert_eq!(balanced, vec![6.0 / 9.0, 2.0, 1.0]);
        let given = "b=2.5, c=0".parse::<ClassWeights>().unwrap();
        assert_eq!(given.resolve(&classes, &labels).unwrap(), vec![1.0, 2.5, 0.0]);
        assert!("d=1"
            .parse::<ClassWeights>()
            .unwrap()
            .resolve(&classes, &labels)
            .unwrap_err()
            .to_string()
            .contains("\"d\""));
        assert!("a=x".parse::<ClassWeights>().unwrap_err().to_string().contains("not a number"));
        assert!("a=-1".parse::<ClassWeights>().unwrap_err().to_string().contains("non-negative"));
        assert!("a".parse::<ClassWeights>().unwrap_err().to_string().contains("class=weight"));
    }

    #[test]
    fn text_round_trips() {
        for text in ["none", "balanced", "coat=1.5,shirt=2", "a=0.1,b=0,c=1000000"] {
            let weights: ClassWeights = text.parse().unwrap();
            assert_eq!(weights.to_string(), text);
            let json = serde_json::to_string(&weights).unwrap();
            assert_eq!(json, format!("{text:?}"));
            assert_eq!(serde_json::from_str::<ClassWeights>(&json).unwrap(), weights);
        }
        assert_eq!(" shirt = 2 , coat=1.5".parse::<ClassWeights>().unwrap().to_string(), "coat=1.5,shirt=2");
        assert!(serde_json::from_str::<ClassWeights>("\"shirt\"").unwrap_err().to_string().contains("class=weight"));
    }

    /// Replays a stream of class indices, checking each example's weight against the formula
    /// written out by hand: n / (classes seen × n_c), this example counted.
    #[test]
    fn balanced_stream_weights_follow_the_running_counts() {
        let names = ["a", "b", "c"];
        let stream = [0, 0, 1, 0, 2, 2, 0, 1];
        // (n, classes seen, n_c) after each example, the example included.
        let expected = [(1, 1, 1), (2, 1, 2), (3, 2, 1), (4, 2, 3), (5, 3, 1), (6, 3, 2), (7, 3, 4), (8, 3, 2)];
        let mut counts = vec![0u64; 3];
        for (&c, &(n, seen, n_c)) in stream.iter().zip(&expected) {
            let weight = ClassWeights::Balanced.stream_weight(names[c], c, &counts);
            assert_eq!(weight, (n as f64 / (seen as f64 * n_c as f64)) as f32, "example of {} at n = {n}", names[c]);
            counts[c] += 1;
        }
        // After the whole stream, the weight of one more example of each class approaches the
        // batch weights of the stream (n = 8: 8/(3×4), 8/(3×2), 8/(3×2)).
        assert_eq!(ClassWeights::Balanced.stream_weight("a", 0, &counts), 9.0 / (3.0 * 5.0));
        // A class the model has but has not learned yet: the first example of a new class.
        assert_eq!(ClassWeights::Balanced.stream_weight("d", 3, &[4, 4, 0, 0][..]), 9.0 / 3.0);
        assert_eq!(ClassWeights::Balanced.stream_weight("a", 0, &[]), 1.0);

        let given: ClassWeights = "b=2.5,z=4".parse().unwrap();
        assert_eq!(given.stream_weight("b", 1, &counts), 2.5);
        assert_eq!(given.stream_weight("a", 0, &counts), 1.0);
        assert_eq!(given.stream_weight("z", 9, &counts), 4.0, "a class discovered later");
        assert_eq!(ClassWeights::None.stream_weight("b", 1, &counts), 1.0);
        assert_eq!(given.unknown_class(&["a".into(), "b".into()]), Some("z"));
        assert_eq!(given.unknown_class(&["b".into(), "z".into()]), None);
    }
}
