//! Priority lanes (pure rules). A conversation is served in one lane for its whole life:
//! the lane of the events-topic partition its id hashes to. Premium chat is served before
//! standard chat, standard chat before batch work, by a consumer that pauses a lane's
//! partitions while its queue is full and picks the next turn by lane weight; so a flood
//! in a lower lane waits in Kafka, not in front of a higher lane's turns.
//!
//! The layout names the partitions of the premium and batch lanes; every other partition
//! is standard. A lane with no partition falls back to standard, so `--lanes none` puts
//! every conversation in one lane (no priorities).

use std::fmt;
use std::str::FromStr;

/// The layout services start with: one premium and one batch partition of six.
pub const DEFAULT_LANES: &str = "premium=0,batch=5";

/// A lane, highest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lane {
    /// Served first.
    Premium,
    /// The default.
    Standard,
    /// Bulk work: served when the others leave room.
    Batch,
}

impl Lane {
    /// Every lane, highest first.
    pub const ALL: [Lane; 3] = [Lane::Premium, Lane::Standard, Lane::Batch];

    /// The lane's name (`premium`, `standard`, `batch`).
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Premium => "premium",
            Lane::Standard => "standard",
            Lane::Batch => "batch",
        }
    }

    /// Position in [`Lane::ALL`]: 0 is served first.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Lane {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Lane::ALL
            .into_iter()
            .find(|lane| lane.as_str() == value)
            .ok_or_else(|| format!("{value:?} is not a lane (premium, standard or batch)"))
    }
}

/// Which events-topic partitions serve the premium and batch lanes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LaneLayout {
    premium: Vec<i32>,
    batch: Vec<i32>,
}

impl LaneLayout {
    /// The lane of `partition`.
    pub fn lane_of(&self, partition: i32) -> Lane {
        if self.premium.contains(&partition) {
            Lane::Premium
        } else if self.batch.contains(&partition) {
            Lane::Batch
        } else {
            Lane::Standard
        }
    }

    /// The lane a conversation meant for `lane` is served in, given `partitions` partitions:
    /// `lane` itself when it has a partition, else standard.
    pub fn effective(&self, lane: Lane, partitions: i32) -> Lane {
        if (0..partitions).any(|p| self.lane_of(p) == lane) { lane } else { Lane::Standard }
    }

    /// Whether every lane shares one queue (no premium or batch partition).
    pub fn is_single_lane(&self) -> bool {
        self.premium.is_empty() && self.batch.is_empty()
    }

    /// Checks the layout against the topic's partition count: named partitions exist and
    /// at least one is left standard.
    pub fn check(&self, partitions: i32) -> Result<(), LayoutError> {
        let named = self.premium.iter().chain(&self.batch);
        if let Some(missing) = named.clone().find(|p| **p >= partitions) {
            return Err(LayoutError::NoSuchPartition { partition: *missing, partitions });
        }
        if !(0..partitions).any(|p| self.lane_of(p) == Lane::Standard) {
            return Err(LayoutError::NoStandardPartition);
        }
        Ok(())
    }
}

/// Why a lane layout does not fit the events topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The layout names a partition the topic does not have.
    #[error("lane partition {partition} does not exist: the topic has {partitions}")]
    NoSuchPartition {
        /// The partition named.
        partition: i32,
        /// How many the topic has.
        partitions: i32,
    },
    /// Every partition is premium or batch: nothing serves the standard lane.
    #[error("no partition is left for the standard lane")]
    NoStandardPartition,
}

impl fmt::Display for LaneLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |ps: &[i32]| ps.iter().map(i32::to_string).collect::<Vec<_>>().join("+");
        match (self.premium.is_empty(), self.batch.is_empty()) {
            (true, true) => f.write_str("none"),
            (false, true) => write!(f, "premium={}", list(&self.premium)),
            (true, false) => write!(f, "batch={}", list(&self.batch)),
            (false, false) => write!(f, "premium={},batch={}", list(&self.premium), list(&self.batch)),
        }
    }
}

impl FromStr for LaneLayout {
    type Err = String;

    /// `premium=0,batch=5`, `premium=0+1,batch=4+5` or `none`.
    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let mut layout = LaneLayout::default();
        if spec.trim() == "none" {
            return Ok(layout);
        }
        for part in spec.split(',').map(str::trim) {
            let (lane, partitions) =
                part.split_once('=').ok_or_else(|| format!("{part:?}: expected LANE=PARTITION[+PARTITION...]"))?;
            let partitions = partitions
                .split('+')
                .map(|p| p.trim().parse::<i32>().ok().filter(|p| *p >= 0))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| format!("{part:?}: partitions are numbers from 0, joined by +"))?;
            let slot = match lane.trim().parse::<Lane>()? {
                Lane::Premium => &mut layout.premium,
                Lane::Batch => &mut layout.batch,
                Lane::Standard => return Err("standard has every partition not named; name premium or batch".into()),
            };
            if !slot.is_empty() {
                return Err(format!("{lane} is named twice"));
            }
            *slot = partitions;
        }
        if let Some(both) = layout.premium.iter().find(|p| layout.batch.contains(p)) {
            return Err(format!("partition {both} is in two lanes"));
        }
        Ok(layout)
    }
}

/// The first candidate (of at most `tries`) that lands in `lane`, or the first one when
/// none does: how a new conversation's id is chosen so that its partition serves its lane.
/// `candidate(n)` must be deterministic, so a resent first message gets the same id.
pub fn pick_in_lane<T>(
    layout: &LaneLayout,
    lane: Lane,
    tries: u32,
    candidate: impl Fn(u32) -> T,
    partition_of: impl Fn(&T) -> i32,
) -> T {
    (0..tries).map(&candidate).find(|c| layout.lane_of(partition_of(c)) == lane).unwrap_or_else(|| candidate(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_parse_name_premium_and_batch_and_leave_the_rest_standard() {
        let layout: LaneLayout = "premium=0,batch=4+5".parse().unwrap();
        let lanes: Vec<Lane> = (0..6).map(|p| layout.lane_of(p)).collect();
        use Lane::*;
        assert_eq!(lanes, [Premium, Standard, Standard, Standard, Batch, Batch]);
        assert_eq!(layout.to_string(), "premium=0,batch=4+5");
        assert_eq!(layout.to_string().parse::<LaneLayout>().unwrap(), layout);
        assert!(layout.check(6).is_ok());
        assert!(!layout.is_single_lane());

        let none: LaneLayout = "none".parse().unwrap();
        assert!(none.is_single_lane());
        assert!((0..6).all(|p| none.lane_of(p) == Standard));
        assert_eq!(none.effective(Premium, 6), Standard);
        assert_eq!(layout.effective(Batch, 6), Batch);
        assert_eq!("premium=1".parse::<LaneLayout>().unwrap().effective(Batch, 6), Standard);
    }

    #[test]
    fn bad_layouts_say_what_is_wrong() {
        for (spec, says) in [
            ("premium", "expected LANE=PARTITION"),
            ("premium=x", "numbers from 0"),
            ("premium=-1", "numbers from 0"),
            ("gold=1", "not a lane"),
            ("standard=1", "every partition not named"),
            ("premium=1,premium=2", "named twice"),
            ("premium=1,batch=1", "in two lanes"),
        ] {
            let error = spec.parse::<LaneLayout>().unwrap_err();
            assert!(error.contains(says), "{spec}: {error}");
        }
        let layout: LaneLayout = "premium=0+1,batch=2".parse().unwrap();
        assert_eq!(layout.check(2), Err(LayoutError::NoSuchPartition { partition: 2, partitions: 2 }));
        assert_eq!(layout.check(3), Err(LayoutError::NoStandardPartition));
    }

    #[test]
    fn an_id_is_picked_in_its_lane_deterministically() {
        let layout: LaneLayout = "premium=0,batch=5".parse().unwrap();
        let partition_of = |n: &u32| i32::try_from(*n % 6).unwrap();
        // Candidate n is the number n + 3, on partition (n + 3) % 6.
        let candidate = |n: u32| n + 3;
        assert_eq!(pick_in_lane(&layout, Lane::Standard, 100, candidate, partition_of), 3);
        assert_eq!(pick_in_lane(&layout, Lane::Batch, 100, candidate, partition_of), 5);
        assert_eq!(pick_in_lane(&layout, Lane::Premium, 100, candidate, partition_of), 6);
        // No candidate fits: the first one.
        assert_eq!(pick_in_lane(&layout, Lane::Premium, 2, candidate, partition_of), 3);
    }
}
