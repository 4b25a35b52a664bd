//! How a driver ranks its work: each partition belongs to a lane (0 is served first), the
//! next free slot goes to a lane with work by weight (stride scheduling, each lane `ratio`
//! times the weight of the lane below it), and a lane may be kept off the last slots so a
//! higher lane's work does not wait for a slot to free. Pure; the driver applies it.

use std::fmt;
use std::sync::Arc;

/// A partition's lane: `(topic, partition) -> lane index`.
type LaneOf = Arc<dyn Fn(&str, i32) -> usize + Send + Sync>;

/// The lanes of a driver's partitions.
#[derive(Clone)]
pub struct Lanes {
    names: Vec<&'static str>,
    of: LaneOf,
    /// Each lane's weight is `ratio` times the next lower lane's.
    ratio: u32,
    /// Per lane, how many of the last free slots it may not take.
    reserved: Vec<usize>,
}

impl fmt::Debug for Lanes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lanes").field("names", &self.names).field("ratio", &self.ratio).finish_non_exhaustive()
    }
}

impl Default for Lanes {
    fn default() -> Self {
        Self::single()
    }
}

impl Lanes {
    /// Every record in one lane: served in log order.
    pub fn single() -> Self {
        Self { names: vec!["all"], of: Arc::new(|_, _| 0), ratio: 1, reserved: vec![0] }
    }

    /// `names` highest first; `of(topic, partition)` is a lane's index in `names`.
    pub fn new(names: Vec<&'static str>, ratio: u32, of: impl Fn(&str, i32) -> usize + Send + Sync + 'static) -> Self {
        let last = names.len().saturating_sub(1);
        let reserved = vec![0; names.len()];
        Self {
            names,
            of: Arc::new(move |topic, partition| of(topic, partition).min(last)),
            ratio: ratio.max(1),
            reserved,
        }
    }

    /// Keeps `lane` off the last `slots` free slots (it may always take one).
    #[must_use]
    pub fn reserve(mut self, lane: usize, slots: usize) -> Self {
        if let Some(reserved) = self.reserved.get_mut(lane) {
            *reserved = slots;
        }
        self
    }

    /// How many lanes there are.
    pub fn count(&self) -> usize {
        self.names.len()
    }

    /// The lanes' names, highest first.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// The lane of `topic`'s `partition`.
    pub fn of(&self, topic: &str, partition: i32) -> usize {
        (self.of)(topic, partition)
    }

    /// Whether `lane` may start a unit while `running` of `concurrency` slots are taken.
    pub fn may_start(&self, lane: usize, running: usize, concurrency: usize) -> bool {
        let reserved = self.reserved.get(lane).copied().unwrap_or(0);
        running < concurrency.saturating_sub(reserved).max(1)
    }

    fn weight(&self, lane: usize) -> u64 {
        let below = u32::try_from(self.count() - 1 - lane).unwrap_or(u32::MAX);
        u64::from(self.ratio).saturating_pow(below)
    }
}

/// Weighted choice among lanes with work: the lane that has had the least service for its
/// weight goes next. A lane without work banks no credit: when it has work again it starts
/// level with the lane served last, so it cannot take every slot for a while.
#[derive(Debug)]
pub struct Stride {
    pass: Vec<u64>,
}

/// Units of service; a lane of weight w advances by `SERVICE / w` per unit started.
const SERVICE: u64 = 1 << 32;

impl Stride {
    /// A stride over `lanes` lanes, none served yet.
    pub fn new(lanes: usize) -> Self {
        Self { pass: vec![0; lanes] }
    }

    /// The lane to serve next among those for which `has_work` holds, charged for it.
    pub fn pick(&mut self, lanes: &Lanes, has_work: impl Fn(usize) -> bool) -> Option<usize> {
        let lane = (0..self.pass.len()).filter(|l| has_work(*l)).min_by_key(|l| (self.pass[*l], *l))?;
        let now = self.pass[lane];
        for (other, pass) in self.pass.iter_mut().enumerate() {
            if !has_work(other) {
                *pass = (*pass).max(now);
            }
        }
        self.pass[lane] += SERVICE / lanes.weight(lane).max(1);
        Some(lane)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Lanes {
        Lanes::new(vec!["premium", "standard", "batch"], 4, |_, partition| usize::try_from(partition).unwrap())
    }

    #[test]
    fn busy_lanes_share_slots_by_weight() {
        let lanes = three();
        let mut stride = Stride::new(3);
        let mut served = [0; 3];
        for _ in 0..21 * 10 {
            served[stride.pick(&lanes, |_| true).unwrap()] += 1;
        }
        assert_eq!(served, [160, 40, 10]);
    }

    #[test]
    fn a_lane_alone_takes_every_slot_and_banks_no_credit_while_idle() {
        let lanes = three();
        let mut stride = Stride::new(3);
        for _ in 0..100 {
            assert_eq!(stride.pick(&lanes, |lane| lane == 2), Some(2));
        }
        assert_eq!(stride.pick(&lanes, |_| false), None);
        // Premium was idle while batch ran 100 units; now both have work, and premium does
        // not get 100 × 16 slots in a row before batch gets one.
        let picks: Vec<usize> = (0..18).map(|_| stride.pick(&lanes, |lane| lane != 1).unwrap()).collect();
        assert_eq!(picks.iter().filter(|l| **l == 2).count(), 1, "{picks:?}");
    }

    #[test]
    fn a_lane_kept_off_the_last_slots_leaves_them_free() {
        let lanes = three().reserve(1, 1).reserve(2, 2);
        assert!(lanes.may_start(2, 1, 4));
        assert!(!lanes.may_start(2, 2, 4));
        assert!(lanes.may_start(1, 2, 4));
        assert!(!lanes.may_start(1, 3, 4));
        assert!(lanes.may_start(0, 3, 4));
        // Fewer slots than reserved: the lane still gets one, or it would starve.
        assert!(lanes.may_start(2, 0, 1));
        assert!(!lanes.may_start(2, 1, 2));
        assert_eq!(lanes.of("t", 7), 2, "out of range: the lowest lane");
        assert_eq!(Lanes::single().of("t", 3), 0);
    }
}
