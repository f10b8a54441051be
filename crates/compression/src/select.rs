//! Keeping the best-scoring slots when several heads share one budget (Ada-KV's
//! head-wise allocation, KVzip's global threshold).
//!
//! A layer's (or a whole cache's) budget is a number of slots; which heads spend it is
//! decided by their scores: the slots with the highest scores across all the heads are
//! kept, after each head has kept its own best `floor` slots (Ada-KV's safeguard). So a
//! head whose attention is spread out keeps more than a head that attends to a few
//! slots, and the memory of what each head drops is freed for real (every head's store
//! has its own length).

use crate::method::HeadInput;
use crate::store::HeadData;
use crate::Error;

/// The slots to keep in each head (ascending indices), `total` in all (at most every
/// slot): each head `h` first keeps its `floors[h]` best slots, then the best of the
/// remaining slots of all heads together fill the rest. Ties: the newer slot, then the
/// later head. NaN scores count as the lowest.
pub fn allocate(scores: &[&[f32]], floors: &[usize], total: usize) -> Vec<Vec<usize>> {
    assert_eq!(scores.len(), floors.len(), "one floor per head");
    let clean = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let all: usize = scores.iter().map(|s| s.len()).sum();
    let total = total.min(all);
    let mut kept: Vec<Vec<usize>> = Vec::with_capacity(scores.len());
    let mut taken = vec![Vec::new(); scores.len()];
    // The safeguard: each head's own best slots.
    for (h, s) in scores.iter().enumerate() {
        let floor = floors[h].min(s.len());
        let mut idx: Vec<usize> = (0..s.len()).collect();
        if floor < s.len() && floor > 0 {
            idx.select_nth_unstable_by(floor - 1, |&a, &b| {
                clean(s[b]).total_cmp(&clean(s[a])).then(b.cmp(&a))
            });
        }
        idx.truncate(floor);
        let mut mask = vec![false; s.len()];
        for &i in &idx {
            mask[i] = true;
        }
        taken[h] = mask;
        kept.push(idx);
    }
    let used: usize = kept.iter().map(|k| k.len()).sum();
    let rest = total.saturating_sub(used);
    if rest > 0 {
        let mut pool: Vec<(usize, usize)> = Vec::with_capacity(all - used);
        for (h, s) in scores.iter().enumerate() {
            pool.extend((0..s.len()).filter(|&i| !taken[h][i]).map(|i| (h, i)));
        }
        let better = |a: &(usize, usize), b: &(usize, usize)| {
            clean(scores[b.0][b.1])
                .total_cmp(&clean(scores[a.0][a.1]))
                .then(b.1.cmp(&a.1))
                .then(b.0.cmp(&a.0))
        };
        if rest < pool.len() {
            pool.select_nth_unstable_by(rest - 1, better);
            pool.truncate(rest);
        }
        for (h, i) in pool {
            kept[h].push(i);
        }
    }
    for k in &mut kept {
        k.sort_unstable();
    }
    kept
}

/// How far one shared budget reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Each head keeps its own budget.
    Head,
    /// The heads of a layer share the layer's budget (Ada-KV).
    Layer,
    /// All heads of all layers share one budget (KVzip's default).
    Model,
}

impl Scope {
    pub fn parse(key: &str, value: &str) -> Result<Scope, Error> {
        match value {
            "head" => Ok(Scope::Head),
            "layer" => Ok(Scope::Layer),
            "model" => Ok(Scope::Model),
            v => Err(Error::InvalidOption(format!(
                "option {key}='{v}' must be one of: head, layer, model"
            ))),
        }
    }
}

/// Groups of input indices that share a budget under `scope`.
pub fn groups(inputs: &[HeadInput<'_>], scope: Scope) -> Vec<Vec<usize>> {
    match scope {
        Scope::Head => (0..inputs.len()).map(|i| vec![i]).collect(),
        Scope::Model => vec![(0..inputs.len()).collect()],
        Scope::Layer => {
            let mut layers: Vec<(usize, Vec<usize>)> = Vec::new();
            for (i, inp) in inputs.iter().enumerate() {
                match layers.iter_mut().find(|(l, _)| *l == inp.pos.layer) {
                    Some((_, v)) => v.push(i),
                    None => layers.push((inp.pos.layer, vec![i])),
                }
            }
            layers.into_iter().map(|(_, v)| v).collect()
        }
    }
}

/// Every head compressed by keeping the top slots of `scores` (one vector per input),
/// each `scope` group spending the sum of its heads' budgets, every head first keeping
/// `floor(alpha * budget)` of its own best (at least one slot).
pub fn keep_top_shared(
    inputs: &[HeadInput<'_>],
    scores: &[Vec<f32>],
    scope: Scope,
    alpha: f32,
) -> Vec<HeadData> {
    kept_shared(inputs, scores, scope, alpha)
        .iter()
        .zip(inputs)
        .map(|(k, i)| i.data.gather(k))
        .collect()
}

/// The slots [`keep_top_shared`] keeps in each head (ascending indices).
pub fn kept_shared(
    inputs: &[HeadInput<'_>],
    scores: &[Vec<f32>],
    scope: Scope,
    alpha: f32,
) -> Vec<Vec<usize>> {
    if scope == Scope::Head {
        return inputs
            .iter()
            .zip(scores)
            .map(|(i, s)| {
                let mut k = top_k(s, (0..s.len()).collect(), i.budget);
                k.sort_unstable();
                k
            })
            .collect();
    }
    let mut out: Vec<Option<Vec<usize>>> = vec![None; inputs.len()];
    for group in groups(inputs, scope) {
        let s: Vec<&[f32]> = group.iter().map(|&i| scores[i].as_slice()).collect();
        let floors: Vec<usize> = group
            .iter()
            .map(|&i| {
                let b = inputs[i].budget.min(inputs[i].data.len());
                ((alpha as f64 * b as f64).floor() as usize).max(1).min(b)
            })
            .collect();
        let total: usize = group.iter().map(|&i| inputs[i].budget).sum();
        for (k, &i) in allocate(&s, &floors, total).into_iter().zip(&group) {
            out[i] = Some(k);
        }
    }
    out.into_iter()
        .map(|o| o.expect("every input is in one group"))
        .collect()
}

/// Errors if some head's budget is below `min` slots (a window every head keeps).
pub fn check_min_slots(
    inputs: &[HeadInput<'_>],
    min: usize,
    method: &str,
    what: &str,
) -> Result<(), Error> {
    for i in inputs {
        let n = i.data.len();
        if i.budget < n && min.min(n) > i.budget {
            return Err(Error::Invalid(format!(
                "{method}: {what} of {min} slots does not fit in the budget of {} slots",
                i.budget
            )));
        }
    }
    Ok(())
}

/// Refuses a window (recent slots, sinks) larger than the budget.
pub(crate) fn window_fits(
    method: &str,
    what: &str,
    window: usize,
    budget: usize,
) -> Result<(), Error> {
    if window > budget {
        return Err(Error::Invalid(format!(
            "{method}: {what} of {window} slots does not fit in the budget of {budget} slots"
        )));
    }
    Ok(())
}

/// The `k` candidates with the highest scores (ties: the newer slot wins), unsorted.
pub fn top_k(scores: &[f32], mut candidates: Vec<usize>, k: usize) -> Vec<usize> {
    if k >= candidates.len() {
        return candidates;
    }
    if k == 0 {
        return Vec::new();
    }
    let better = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(b.cmp(a));
    candidates.select_nth_unstable_by(k - 1, better);
    candidates.truncate(k);
    candidates
}

/// The slots at `indices` (any order, no duplicates), in slot order, unchanged.
pub(crate) fn keep(data: &HeadData, mut indices: Vec<usize>) -> HeadData {
    indices.sort_unstable();
    debug_assert!(indices.windows(2).all(|w| w[0] < w[1]));
    data.gather(&indices)
}

/// The `budget` best slots of `scores` (infinite scores first), in slot order.
pub(crate) fn keep_top(data: &HeadData, scores: &[f32], budget: usize) -> HeadData {
    keep(data, top_k(scores, (0..data.len()).collect(), budget))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_spends_exactly_the_total_and_keeps_every_floor() {
        let a: Vec<f32> = (0..10).map(|i| i as f32).collect(); // head 0: increasing
        let b: Vec<f32> = vec![100.0; 10]; // head 1: everything better than head 0
        let kept = allocate(&[&a, &b], &[3, 3], 10);
        assert_eq!(kept[0], vec![7, 8, 9], "head 0 keeps only its safeguard");
        assert_eq!(kept[1].len(), 7);
        assert_eq!(kept.iter().map(|k| k.len()).sum::<usize>(), 10);
    }

    #[test]
    fn allocation_takes_the_global_best_beyond_the_floors() {
        let a = [5.0, 1.0, 4.0, 0.0];
        let b = [3.0, 2.0, 6.0, -1.0];
        // Floors of one: a keeps 0, b keeps 2; the next best overall are a2 (4) and b0 (3).
        let kept = allocate(&[&a, &b], &[1, 1], 4);
        assert_eq!(kept, vec![vec![0, 2], vec![0, 2]]);
        // Infinite scores always win; the total never exceeds the slots there are.
        let c = [f32::INFINITY, 0.0];
        let kept = allocate(&[&c, &a], &[0, 0], 100);
        assert_eq!(kept, vec![vec![0, 1], vec![0, 1, 2, 3]]);
        let kept = allocate(&[&c, &a], &[0, 0], 1);
        assert_eq!(kept, vec![vec![0], vec![]]);
    }

    #[test]
    fn ties_go_to_the_newer_slot_and_nan_is_lowest() {
        let a = [1.0, 1.0, f32::NAN, 1.0];
        assert_eq!(allocate(&[&a], &[0], 2), vec![vec![1, 3]]);
    }
}
