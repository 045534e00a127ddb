//! Requests written and not yet answered, found by the id their answer carries.
//!
//! A slab: an id's low 24 bits are its slot and the high 40 the slot's generation, so finding
//! an answer's request is an index and a compare, where a hash table's insert and remove cost
//! more than the rest of a frame's bookkeeping. A slot's generation moves on whenever it is
//! emptied, so a late answer (its request already failed by its deadline) never matches the
//! request that took the slot since: that would take 2^40 reuses of one slot within the
//! answer's lateness (12 days at a million requests a second on a link with one slot in
//! use). Generations start at 1, so no id is 0: an answer with id 0 (a peer's answer to a
//! frame it could not read) matches nothing.

/// Bits of an id that name its slot.
const SLOT_BITS: u32 = 24;
/// Requests a link may have waiting at once (16,777,216): one more is refused.
pub(super) const MAX_PENDING: usize = 1 << SLOT_BITS;
const GENERATIONS: u64 = 1 << (64 - SLOT_BITS);

/// One slot: its generation and what waits in it.
struct Slot<T> {
    generation: u64,
    entry: Option<T>,
}

pub(super) struct Pending<T> {
    slots: Vec<Slot<T>>,
    /// Empty slots, reused last freed first (its cache lines are likely warm).
    free: Vec<u32>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Pending {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Pending<T> {
    /// Keeps `entry` and returns the id its answer will carry; gives it back if
    /// [`MAX_PENDING`] requests wait already.
    pub(super) fn insert(&mut self, entry: T) -> Result<u64, T> {
        let index = match self.free.pop() {
            Some(index) => index as usize,
            None if self.slots.len() < MAX_PENDING => {
                self.slots.push(Slot {
                    generation: 1,
                    entry: None,
                });
                self.slots.len() - 1
            }
            None => return Err(entry),
        };
        let slot = &mut self.slots[index];
        slot.entry = Some(entry);
        Ok(slot.generation << SLOT_BITS | index as u64)
    }

    /// Takes what waits under `id`, if anything still does.
    pub(super) fn remove(&mut self, id: u64) -> Option<T> {
        let index = (id & (MAX_PENDING as u64 - 1)) as usize;
        let slot = self.slots.get_mut(index)?;
        if slot.generation != id >> SLOT_BITS {
            return None;
        }
        let entry = slot.entry.take()?;
        self.release(index);
        Some(entry)
    }

    /// Takes every entry for which `take` says so.
    pub(super) fn extract_if(&mut self, mut take: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut taken = Vec::new();
        for index in 0..self.slots.len() {
            let slot = &mut self.slots[index];
            if slot.entry.as_ref().is_some_and(&mut take) {
                taken.extend(slot.entry.take());
                self.release(index);
            }
        }
        taken
    }

    /// Takes every entry.
    pub(super) fn drain(&mut self) -> Vec<T> {
        self.extract_if(|_| true)
    }

    fn release(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        // Past the last generation, 1 again (never 0); a compare, not a division, per answer.
        slot.generation = if slot.generation == GENERATIONS - 1 {
            1
        } else {
            slot.generation + 1
        };
        self.free.push(index as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_finds_its_request_once() {
        let mut p = Pending::default();
        let a = p.insert("a").unwrap();
        let b = p.insert("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(p.remove(b), Some("b"));
        assert_eq!(p.remove(b), None);
        assert_eq!(p.remove(a), Some("a"));
        assert_eq!(p.remove(12345), None);
        assert_eq!(p.remove(0), None);
        assert!(a != 0 && b != 0, "no id is 0");
    }

    #[test]
    fn a_late_answer_does_not_match_the_request_that_took_its_slot() {
        let mut p = Pending::default();
        let late = p.insert("expired").unwrap();
        assert_eq!(p.extract_if(|e| *e == "expired"), vec!["expired"]);
        let next = p.insert("next").unwrap();
        assert_eq!(
            next % MAX_PENDING as u64,
            late % MAX_PENDING as u64,
            "the slot is reused"
        );
        assert_eq!(p.remove(late), None);
        assert_eq!(p.remove(next), Some("next"));
    }

    #[test]
    fn drain_takes_everything_and_the_slots_stay_usable() {
        let mut p = Pending::default();
        let ids: Vec<u64> = (0..5).map(|i| p.insert(i).unwrap()).collect();
        assert_eq!(p.remove(ids[2]), Some(2));
        let mut drained = p.drain();
        drained.sort();
        assert_eq!(drained, vec![0, 1, 3, 4]);
        assert!(ids.iter().all(|&id| p.remove(id).is_none()));
        let id = p.insert(9).unwrap();
        assert_eq!(p.remove(id), Some(9));
    }

    #[test]
    fn generations_wrap_to_1_never_0() {
        let mut p = Pending::default();
        let first = p.insert(()).unwrap();
        assert_eq!(first >> SLOT_BITS, 1);
        assert!(p.remove(first).is_some());
        p.slots[0].generation = GENERATIONS - 1;
        let last = p.insert(()).unwrap();
        assert_eq!(
            last >> SLOT_BITS,
            GENERATIONS - 1,
            "the last generation fits the id"
        );
        assert!(p.remove(last).is_some());
        let wrapped = p.insert(()).unwrap();
        assert_eq!(wrapped >> SLOT_BITS, 1);
        assert_ne!(wrapped, 0);
    }
}
