//! Requests written and not yet answered, found by the id their answer carries.
//!
//! A slab: an id's low 32 bits are its slot and the high 32 the slot's generation, so finding
//! an answer's request is an index and a compare, where a hash table's insert and remove cost
//! more than the rest of a frame's bookkeeping. A slot's generation moves on whenever it is
//! emptied, so a late answer (its request already failed by its deadline) never matches the
//! request that took the slot since; it would take 2^32 reuses of one slot within that
//! answer's lateness. Generations start at 1, so no id is 0: an answer with id 0 (a peer's
//! answer to a frame it could not read) matches nothing.

/// One slot: its generation and what waits in it.
struct Slot<T> {
    generation: u32,
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
    /// Keeps `entry` and returns the id its answer will carry.
    pub(super) fn insert(&mut self, entry: T) -> u64 {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                // More than 2^32 requests at once cannot be: each holds memory.
                let index = u32::try_from(self.slots.len()).expect("fewer than 2^32 requests");
                self.slots.push(Slot {
                    generation: 1,
                    entry: None,
                });
                index
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.entry = Some(entry);
        u64::from(slot.generation) << 32 | u64::from(index)
    }

    /// Takes what waits under `id`, if anything still does.
    pub(super) fn remove(&mut self, id: u64) -> Option<T> {
        let index = id as u32;
        let slot = self.slots.get_mut(index as usize)?;
        if u64::from(slot.generation) != id >> 32 {
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
                self.release(index as u32);
            }
        }
        taken
    }

    /// Takes every entry.
    pub(super) fn drain(&mut self) -> Vec<T> {
        self.extract_if(|_| true)
    }

    fn release(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.checked_add(1).unwrap_or(1);
        self.free.push(index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_finds_its_request_once() {
        let mut p = Pending::default();
        let a = p.insert("a");
        let b = p.insert("b");
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
        let late = p.insert("expired");
        assert_eq!(p.extract_if(|e| *e == "expired"), vec!["expired"]);
        let next = p.insert("next");
        assert_eq!(next as u32, late as u32, "the slot is reused");
        assert_eq!(p.remove(late), None);
        assert_eq!(p.remove(next), Some("next"));
    }

    #[test]
    fn drain_takes_everything_and_the_slots_stay_usable() {
        let mut p = Pending::default();
        let ids: Vec<u64> = (0..5).map(|i| p.insert(i)).collect();
        assert_eq!(p.remove(ids[2]), Some(2));
        let mut drained = p.drain();
        drained.sort();
        assert_eq!(drained, vec![0, 1, 3, 4]);
        assert!(ids.iter().all(|&id| p.remove(id).is_none()));
        let id = p.insert(9);
        assert_eq!(p.remove(id), Some(9));
    }
}
