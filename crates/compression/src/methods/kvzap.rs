//! `kvzap`: KVzap (arXiv 2601.07891), KVzip's selection without
//! its second pass. A small model per layer, trained once per language model, predicts
//! from each token's hidden state (the attention block's normalized input) the log of
//! the score KVzip's reconstruction pass would give that token in each KV head. The
//! engine evaluates it inside the prefill it already runs (one product of the hidden
//! state with a `hidden × kv_heads` matrix per layer), so compression costs a few
//! percent of the prefill instead of another 1.3 to 1.5 prefills, and works during
//! chunked prefill and decoding, where KVzip's pass cannot.
//!
//! Selection is KVzip's: by default (`scope=model`) one threshold over all layers and
//! heads on the predicted scores, so heads and layers keep different shares; the first
//! `sinks` slots and the chat template's opening are always kept. Scores are the
//! predicted KVzip scores (the exponential of the prediction), so composites that
//! weigh slots by their score (`kvmerger+`) read them as KVzip's.
//!
//! Options: `scope` (`model`), `sinks` (4).

use super::OptionDoc;

pub const SUMMARY: &str =
    "KVzap: KVzip's scores predicted from hidden states by a trained per-layer model (no extra pass)";
/// KVzip's options.
pub const OPTIONS: &[OptionDoc] = super::kvzip::OPTIONS;

/// KVzip's scorer reading the predicted scores.
pub type KvZap = super::kvzip::KvZip<true>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::{HeadInput, HeadStats};
    use crate::scorer::{Scorer, Selection};
    use crate::select::Scope;
    use crate::store::{HeadData, SlotMeta};
    use crate::{HeadPos, Method};

    #[test]
    fn keeps_the_sinks_and_the_highest_predictions() {
        let mut d = HeadData::new(2);
        for i in 0..10u32 {
            d.push(&[1.0, i as f32], &[0.0, 1.0], SlotMeta::token(i));
        }
        let predicted: Vec<f32> = (0..10).map(|i| -((i * 7 % 10) as f32)).collect();
        let stats = HeadStats {
            learned: Some(predicted),
            ..Default::default()
        };
        let m = Selection(Box::new(KvZap {
            scope: Scope::Head,
            sinks: 2,
        }));
        let out = m
            .compress(HeadInput {
                data: &d,
                stats: &stats,
                pos: HeadPos::SINGLE,
                budget: 4,
            })
            .unwrap();
        let kept: Vec<u32> = out.meta.iter().map(|m| m.position).collect();
        // Sinks 0 and 1; then the best predictions: slot 10 - ... i*7%10 smallest at
        // i = 0 (sink), 3 (1), 6 (2): slots 3 and 6.
        assert_eq!(kept, vec![0, 1, 3, 6]);
    }

    #[test]
    fn without_predictions_it_names_the_missing_statistic() {
        let mut d = HeadData::new(1);
        d.push(&[1.0], &[1.0], SlotMeta::token(0));
        d.push(&[1.0], &[1.0], SlotMeta::token(1));
        let z = KvZap {
            scope: Scope::Head,
            sinks: 0,
        };
        let e = z
            .scores(&HeadInput {
                data: &d,
                stats: &HeadStats::default(),
                pos: HeadPos::SINGLE,
                budget: 1,
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("kvzap") && e.contains("learned"), "{e}");
    }
}
