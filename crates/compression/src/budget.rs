//! Budgets: how many slots each (layer, KV head) may keep.

use crate::Error;

/// A budget for a whole cache, per head: a fraction of the prompt or a token count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Keep this fraction of the slots, in (0, 1].
    Fraction(f64),
    /// Keep at most this many slots per head.
    Tokens(usize),
}

impl Budget {
    /// Slots a head of `len` slots may keep (at least 1, at most `len`).
    pub fn slots(&self, len: usize) -> usize {
        let b = match *self {
            Budget::Fraction(f) => (f * len as f64).round() as usize,
            Budget::Tokens(t) => t,
        };
        b.clamp(1.min(len), len)
    }
}

impl std::str::FromStr for Budget {
    type Err = Error;
    /// `0.5` or `50%` is a fraction; an integer above 1 (`2048`) is a token count; `1` and `1.0` mean everything.
    fn from_str(s: &str) -> Result<Self, Error> {
        let t = s.trim();
        let bad = |why: &str| Error::InvalidBudget(format!("'{s}': {why}"));
        if let Some(p) = t.strip_suffix('%') {
            let f: f64 = p.trim().parse().map_err(|_| bad("not a percentage"))?;
            return Budget::fraction(f / 100.0);
        }
        if !t.contains('.') && !t.contains('e') {
            if t.starts_with('-') {
                return Err(bad("a token count cannot be negative"));
            }
            let n: usize = t.parse().map_err(|_| bad("not a number"))?;
            return match n {
                0 => Err(bad("a budget must be above 0")),
                1 => Ok(Budget::Fraction(1.0)),
                n => Ok(Budget::Tokens(n)),
            };
        }
        let f: f64 = t.parse().map_err(|_| bad("not a number"))?;
        Budget::fraction(f)
    }
}

impl Budget {
    pub fn fraction(f: f64) -> Result<Budget, Error> {
        if !(f.is_finite() && f > 0.0 && f <= 1.0) {
            return Err(Error::InvalidBudget(format!(
                "a fractional budget must be in (0, 1], got {f}"
            )));
        }
        Ok(Budget::Fraction(f))
    }
}

impl std::fmt::Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Budget::Fraction(x) => write!(f, "{:.0}%", x * 100.0),
            Budget::Tokens(t) => write!(f, "{t} tokens"),
        }
    }
}

/// Whether a head of `len` slots should be compressed again while decoding: once it has
/// grown past its `budget` by more than `margin` slots. Re-compressing in batches of
/// `margin` tokens, rather than at every step, keeps the cost per decoded token small.
pub fn should_recompress(len: usize, budget: usize, margin: usize) -> bool {
    len > budget.saturating_add(margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fractions_percentages_and_counts() {
        assert_eq!("0.5".parse::<Budget>().unwrap(), Budget::Fraction(0.5));
        assert_eq!("35%".parse::<Budget>().unwrap(), Budget::Fraction(0.35));
        assert_eq!("2048".parse::<Budget>().unwrap(), Budget::Tokens(2048));
        assert_eq!("1.0".parse::<Budget>().unwrap(), Budget::Fraction(1.0));
    }

    #[test]
    fn rejects_out_of_range_and_negative_budgets() {
        for bad in ["0", "0.0", "-0.2", "1.5", "-3", "abc", "", "nan"] {
            assert!(bad.parse::<Budget>().is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn recompression_waits_until_the_budget_is_passed_by_the_margin() {
        assert!(!should_recompress(100, 100, 0));
        assert!(should_recompress(101, 100, 0));
        assert!(!should_recompress(116, 100, 16));
        assert!(should_recompress(117, 100, 16));
        assert!(!should_recompress(10, usize::MAX, 5));
    }

    #[test]
    fn slots_round_and_clamp() {
        assert_eq!(Budget::Fraction(0.5).slots(101), 51);
        assert_eq!(Budget::Tokens(500).slots(100), 100);
        assert_eq!(Budget::Fraction(0.01).slots(10), 1);
    }
}
