//! The pair-merging loop shared by byte-level BPE (pairs ordered by merge rank)
//! and SentencePiece-style BPE (pairs ordered by the score of the merged piece).
//!
//! Symbols form a doubly linked list over a byte string; candidate pairs sit in
//! a max-heap ordered by priority and then by position (leftmost first). A
//! merge folds the right symbol into the left one, so a symbol's index stays
//! valid while it lives and the first symbol never dies. Heap entries that a
//! neighbouring merge made stale are recognised and dropped when popped, which
//! keeps the whole loop at O(n log n) in the length of the input.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

const NONE: usize = usize::MAX;

/// One symbol: the byte range `start..end` of the input and its token id, if
/// the range is a token.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Symbol {
    pub start: usize,
    pub end: usize,
    pub id: Option<u32>,
    prev: usize,
    next: usize,
    alive: bool,
}

struct Candidate {
    priority: f64,
    left: usize,
    right: usize,
    /// `end` of the right symbol when the candidate was made: a later merge
    /// that grew the right symbol makes the candidate stale.
    right_end: usize,
    id: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: higher priority first, then the leftmost pair.
        self.priority
            .total_cmp(&other.priority)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Reusable buffers for [`Merger::run`].
#[derive(Default)]
pub(crate) struct Merger {
    syms: Vec<Symbol>,
    heap: BinaryHeap<Candidate>,
}

impl Merger {
    /// Merges the initial symbols `(start, end, id)` (contiguous, in order)
    /// for as long as `pair(left, right)` offers a merge, best priority first;
    /// `pair` returns the priority of merging two adjacent symbols and the id
    /// of the merged token. Returns the surviving symbols in order.
    pub fn run<I, F>(&mut self, initial: I, mut pair: F) -> impl Iterator<Item = &Symbol>
    where
        I: IntoIterator<Item = (usize, usize, Option<u32>)>,
        F: FnMut(&Symbol, &Symbol) -> Option<(f64, u32)>,
    {
        self.syms.clear();
        self.heap.clear();
        for (start, end, id) in initial {
            let i = self.syms.len();
            self.syms.push(Symbol {
                start,
                end,
                id,
                prev: if i == 0 { NONE } else { i - 1 },
                next: i + 1,
                alive: true,
            });
        }
        if let Some(last) = self.syms.last_mut() {
            last.next = NONE;
        }
        for i in 1..self.syms.len() {
            self.offer(i - 1, i, &mut pair);
        }
        while let Some(c) = self.heap.pop() {
            let (l, r) = (self.syms[c.left], self.syms[c.right]);
            if !l.alive || !r.alive || l.next != c.right || r.end != c.right_end {
                continue;
            }
            let left = &mut self.syms[c.left];
            left.end = r.end;
            left.id = Some(c.id);
            left.next = r.next;
            self.syms[c.right].alive = false;
            if r.next != NONE {
                self.syms[r.next].prev = c.left;
            }
            if l.prev != NONE {
                self.offer(l.prev, c.left, &mut pair);
            }
            if r.next != NONE {
                self.offer(c.left, r.next, &mut pair);
            }
        }
        let syms = &self.syms;
        let mut i = if syms.is_empty() { NONE } else { 0 };
        std::iter::from_fn(move || {
            if i == NONE {
                return None;
            }
            let s = &syms[i];
            i = s.next;
            Some(s)
        })
    }

    fn offer<F>(&mut self, left: usize, right: usize, pair: &mut F)
    where
        F: FnMut(&Symbol, &Symbol) -> Option<(f64, u32)>,
    {
        let (l, r) = (&self.syms[left], &self.syms[right]);
        if let Some((priority, id)) = pair(l, r) {
            self.heap.push(Candidate {
                priority,
                left,
                right,
                right_end: r.end,
                id,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn merges_best_pair_first_and_leftmost_on_ties() {
        // "aaa" with the single merge a+a: leftmost pair wins, leaving "aa" "a".
        let text = "aaa";
        let mut m = Merger::default();
        let out: Vec<(usize, usize)> = m
            .run((0..3).map(|i| (i, i + 1, Some(0))), |l, r| {
                (&text[l.start..r.end] == "aa").then_some((1.0, 1))
            })
            .map(|s| (s.start, s.end))
            .collect();
        assert_eq!(out, vec![(0, 2), (2, 3)]);
    }

    #[test]
    fn stale_candidates_are_dropped() {
        // "abc": "bc" (priority 3) beats "ab" (2); then "abc" needs a+bc.
        let text = "abc";
        let vocab: HashMap<&str, (f64, u32)> =
            [("ab", (2.0, 10)), ("bc", (3.0, 11)), ("abc", (1.0, 12))]
                .into_iter()
                .collect();
        let mut m = Merger::default();
        let out: Vec<Option<u32>> = m
            .run((0..3).map(|i| (i, i + 1, None)), |l, r| {
                vocab.get(&text[l.start..r.end]).copied()
            })
            .map(|s| s.id)
            .collect();
        assert_eq!(out, vec![Some(12)]);
        let none: Vec<_> = m.run(std::iter::empty(), |_, _| None).collect();
        assert!(none.is_empty());
    }
}
