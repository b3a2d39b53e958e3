//! Which offsets may be committed: per partition, everything below the oldest command not yet
//! delivered (or dead-lettered). Commands finish out of order (one device waits, the others go
//! on); the committed position never passes one that has not finished.

use std::collections::{BTreeSet, HashMap};

#[derive(Default)]
pub struct Offsets {
    parts: HashMap<(String, i32), Part>,
}

#[derive(Default)]
struct Part {
    outstanding: BTreeSet<i64>,
    /// One past the highest offset consumed.
    next: i64,
    /// The position last handed out for committing.
    committable: Option<i64>,
}

impl Offsets {
    /// `Some(position)` for a partition's first record: before anything finished, the
    /// committable position is where consuming started (nothing to store yet).
    pub fn consumed(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let part = self.parts.entry((topic.to_owned(), partition)).or_default();
        let first = part.committable.is_none().then_some(offset);
        part.committable.get_or_insert(offset);
        part.outstanding.insert(offset);
        part.next = part.next.max(offset + 1);
        first
    }

    /// The command at `offset` finished; `Some(position)` when the committable position moved
    /// (the next offset to consume, as Kafka commits it).
    pub fn finished(&mut self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let part = self.parts.get_mut(&(topic.to_owned(), partition))?;
        part.outstanding.remove(&offset);
        let position = part.outstanding.first().copied().unwrap_or(part.next);
        if part.committable.is_some_and(|c| c >= position) {
            return None;
        }
        part.committable = Some(position);
        Some(position)
    }

    /// Every partition's committable position.
    pub fn committable(&self) -> impl Iterator<Item = (&str, i32, i64)> {
        self.parts
            .iter()
            .filter_map(|((t, p), part)| Some((t.as_str(), *p, part.committable?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_position_stops_at_the_oldest_unfinished_command() {
        let mut o = Offsets::default();
        for offset in 10..15 {
            o.consumed("t", 0, offset);
        }
        assert_eq!(o.finished("t", 0, 11), None, "10 is not finished");
        assert_eq!(o.finished("t", 0, 12), None);
        assert_eq!(o.finished("t", 0, 10), Some(13));
        assert_eq!(o.finished("t", 0, 14), None, "13 is not finished");
        assert_eq!(o.finished("t", 0, 13), Some(15));
        assert_eq!(o.committable().collect::<Vec<_>>(), [("t", 0, 15)]);
    }

    #[test]
    fn partitions_are_independent() {
        let mut o = Offsets::default();
        o.consumed("t", 0, 5);
        o.consumed("t", 1, 7);
        assert_eq!(o.finished("t", 1, 7), Some(8));
        assert_eq!(o.finished("u", 1, 7), None);
        assert_eq!(o.finished("t", 0, 5), Some(6));
    }
}
