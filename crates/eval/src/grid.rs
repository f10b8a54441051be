//! A grid of methods × budgets × tasks × lengths, and how it is cut into work items.
//!
//! A work item is one sample: (task, length, index). Every configuration (the full
//! cache, and each method at each budget) is evaluated on it from one prefill, so the
//! item, not the configuration, is the unit of work, of resumption and of sharding.

use kvmerger_compression::{Budget, Recipe, ScheduleFiles};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Task names that score text continuation rather than answers: perplexity of the
/// next tokens and fidelity to the full cache, on a long text.
pub const TEXT_TASK: &str = "ppl";

/// A grid as written in a TOML file or assembled from command-line flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GridSpec {
    /// Methods, each `name` or `name:key=value,key=value` (e.g. `kvmerger:sigma=2`).
    /// The full cache is always evaluated as the reference and need not be listed.
    pub methods: Vec<String>,
    /// Budgets: fractions (`0.5`, `35%`) or token counts (`1024`).
    pub budgets: Vec<String>,
    /// Task names (see `tasks::task_names()`), or `ppl` for perplexity and fidelity.
    pub tasks: Vec<String>,
    /// Prompt lengths in tokens.
    pub lengths: Vec<usize>,
    /// Samples per (task, length).
    #[serde(default = "default_samples")]
    pub samples: usize,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// For `ppl`: the text, `austen` (the default) or a path to a UTF-8 file.
    #[serde(default = "default_text")]
    pub text: String,
    /// For `ppl`: how many tokens after the compressed prefix are scored.
    #[serde(default = "default_ppl_tokens")]
    pub ppl_tokens: usize,
    /// Re-compress during decoding once a head passes its budget by this many slots;
    /// unset: compress the prompt once and let decoding grow the cache.
    #[serde(default)]
    pub recompress_margin: Option<usize>,
    /// When compression happens, for methods whose spec does not say
    /// (`protocol=` in a method's options): `agnostic` (the default: the context is
    /// compressed before the question is appended) or `aware` (the question is part of
    /// what is compressed).
    #[serde(default)]
    pub protocol: Protocol,
}

pub use kvmerger_compression::Protocol;

fn default_samples() -> usize {
    10
}
fn default_seed() -> u64 {
    42
}
fn default_text() -> String {
    "austen".into()
}
fn default_ppl_tokens() -> usize {
    128
}

impl Default for GridSpec {
    fn default() -> Self {
        GridSpec {
            methods: Vec::new(),
            budgets: Vec::new(),
            tasks: Vec::new(),
            lengths: Vec::new(),
            samples: default_samples(),
            seed: default_seed(),
            text: default_text(),
            ppl_tokens: default_ppl_tokens(),
            recompress_margin: None,
            protocol: Protocol::default(),
        }
    }
}

/// One configuration of the grid: a method at a budget, or the full cache.
#[derive(Clone, Debug, PartialEq)]
pub struct RunConfig {
    /// `full`, or `method@budget` with the method spec as written (`kvmerger:sigma=2@0.5`).
    pub label: String,
    pub method: String,
    /// Everything that builds the compressor (the budget included).
    pub recipe: Recipe,
    /// None for the full cache.
    pub budget: Option<Budget>,
    /// The budget as written, for reports.
    pub budget_label: String,
    /// When it compresses (the full cache answers the same either way).
    pub protocol: Protocol,
}

impl RunConfig {
    pub fn full() -> RunConfig {
        RunConfig {
            label: "full".into(),
            method: "full".into(),
            recipe: Recipe::full(),
            budget: None,
            budget_label: "1".into(),
            protocol: Protocol::Agnostic,
        }
    }
}

/// A method spec read by [`parse_method`].
#[derive(Clone, Debug, PartialEq)]
pub struct MethodSpec {
    pub name: String,
    /// The method, its options, schedule, re-compression margin and prefill chunk
    /// (no budget: the grid gives those).
    pub recipe: Recipe,
    /// `protocol=` in the spec, if given.
    pub protocol: Option<Protocol>,
    /// `budgets=` in the spec (slash-separated, e.g. `0.75/0.125`): this method's
    /// budgets instead of the grid's.
    pub budgets: Option<Vec<String>>,
    /// The spec as written without `budgets=` (what labels show).
    pub label: String,
}

/// `name` or `name:key=value,key=value`, read by the compression crate's [`Recipe`]
/// (method options, `schedule`, `recompress_margin`, `prefill_chunk`), with two keys of
/// the grid's own: `protocol` (`agnostic` or `aware`, see [`Protocol`]) and `budgets`
/// (this method's budgets, slash-separated). A `schedule` is `uniform`, `pyramid`,
/// `pyramid:<slope>`, or a per-layer ratio file such as `kvmerger analyze sparsity`'s
/// `sparsity_schedule.csv` (a path without commas).
pub fn parse_method(spec: &str) -> Result<MethodSpec, GridError> {
    let bad = |e: &dyn fmt::Display| GridError(format!("method '{spec}': {e}"));
    let (name, opts) = match spec.split_once(':') {
        Some((n, o)) => (n.trim(), o),
        None => (spec.trim(), ""),
    };
    let mut recipe = Recipe::full();
    recipe.set_method(name).map_err(|e| GridError(e.message))?;
    let mut protocol = None;
    let mut budgets = None;
    let mut kept_pairs: Vec<&str> = Vec::new();
    for pair in opts.split(',').filter(|p| !p.trim().is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(bad(&format!("'{pair}' is not of the form key=value")));
        };
        match k.trim() {
            "budgets" => {
                let list: Vec<String> = v
                    .split('/')
                    .map(|b| b.trim().to_string())
                    .filter(|b| !b.is_empty())
                    .collect();
                for b in &list {
                    Budget::from_str(b).map_err(|e| bad(&e))?;
                }
                if list.is_empty() {
                    return Err(bad(&"budgets= lists no budget"));
                }
                budgets = Some(list);
                continue;
            }
            "protocol" => protocol = Some(v.parse::<Protocol>().map_err(|e| bad(&e))?),
            "budget" | "method" => {
                return Err(bad(&format!(
                    "'{}' is set by the grid, not in a method spec",
                    k.trim()
                )))
            }
            key => recipe
                .set(key, v, ScheduleFiles::Read)
                .map_err(|e| bad(&e))?,
        }
        kept_pairs.push(pair.trim());
    }
    // Building the method checks its options now rather than in the middle of a grid.
    let mut probe = recipe.clone();
    probe.budget = Some(Budget::Fraction(0.5));
    probe.validate().map_err(|e| bad(&e))?;
    let label = if kept_pairs.is_empty() {
        name.to_string()
    } else {
        format!("{name}:{}", kept_pairs.join(","))
    };
    Ok(MethodSpec {
        name: name.to_string(),
        recipe,
        protocol,
        budgets,
        label,
    })
}

#[derive(Clone, Debug, PartialEq)]
pub struct GridError(pub String);

impl fmt::Display for GridError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for GridError {}

impl GridSpec {
    /// Parse a TOML grid file's text.
    pub fn from_toml(text: &str) -> Result<GridSpec, GridError> {
        toml::from_str(text).map_err(|e| GridError(format!("grid file: {e}")))
    }

    /// Check everything that can be checked before loading a model.
    pub fn validate(&self, known_tasks: &[&str]) -> Result<(), GridError> {
        if self.tasks.is_empty() {
            return Err(GridError("the grid has no tasks".into()));
        }
        if self.lengths.is_empty() {
            return Err(GridError("the grid has no lengths".into()));
        }
        if self.samples == 0 {
            return Err(GridError("samples must be at least 1".into()));
        }
        if self.budgets.is_empty()
            && self
                .methods
                .iter()
                .any(|m| m.trim() != "full" && !m.contains("budgets="))
        {
            return Err(GridError("methods were given but no budgets".into()));
        }
        for t in &self.tasks {
            if t != TEXT_TASK && !known_tasks.contains(&t.as_str()) {
                return Err(GridError(format!(
                    "unknown task '{t}' (known: {}, {TEXT_TASK})",
                    known_tasks.join(", ")
                )));
            }
        }
        if let Some(&l) = self.lengths.iter().find(|&&l| l < 64) {
            return Err(GridError(format!(
                "length {l} is too short: lengths are prompt tokens, at least 64"
            )));
        }
        if self.tasks.iter().any(|t| t == TEXT_TASK) && self.ppl_tokens == 0 {
            return Err(GridError("ppl_tokens must be at least 1".into()));
        }
        self.configs().map(|_| ())
    }

    /// The full cache first, then every method at every budget, in the order given.
    pub fn configs(&self) -> Result<Vec<RunConfig>, GridError> {
        let mut out = vec![RunConfig::full()];
        let mut budgets = Vec::new();
        for b in &self.budgets {
            let budget = Budget::from_str(b).map_err(|e| GridError(e.to_string()))?;
            budgets.push((b.trim().to_string(), budget));
        }
        for m in &self.methods {
            if m.trim() == "full" {
                continue;
            }
            let spec = parse_method(m)?;
            let protocol = spec.protocol.unwrap_or(self.protocol);
            // An aware configuration says so in its label, however it was asked for.
            let written = match (protocol, spec.protocol) {
                (Protocol::Aware, None) if spec.label.contains(':') => {
                    format!("{},protocol=aware", spec.label)
                }
                (Protocol::Aware, None) => format!("{}:protocol=aware", spec.label),
                _ => spec.label.clone(),
            };
            let own: Vec<(String, Budget)> = match &spec.budgets {
                Some(list) => list
                    .iter()
                    .map(|b| Budget::from_str(b).map(|x| (b.clone(), x)))
                    .collect::<Result<_, _>>()
                    .map_err(|e| GridError(e.to_string()))?,
                None => budgets.clone(),
            };
            for (label, budget) in &own {
                let mut recipe = spec.recipe.clone();
                recipe.budget = Some(*budget);
                let c = RunConfig {
                    label: format!("{written}@{label}"),
                    method: spec.name.clone(),
                    recipe,
                    budget: Some(*budget),
                    budget_label: label.clone(),
                    protocol,
                };
                if out.iter().any(|o: &RunConfig| o.label == c.label) {
                    return Err(GridError(format!("'{}' is listed twice", c.label)));
                }
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Every work item, in a fixed order: tasks, then lengths, then sample indices.
    pub fn items(&self) -> Vec<WorkItem> {
        let mut v = Vec::new();
        for t in &self.tasks {
            for &length in &self.lengths {
                for index in 0..self.samples {
                    v.push(WorkItem {
                        task: t.clone(),
                        length,
                        index,
                    });
                }
            }
        }
        v
    }
}

/// One sample of the grid.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkItem {
    pub task: String,
    pub length: usize,
    pub index: usize,
}

/// `i/n`: this process runs items `i, i + n, i + 2n, ...` (0 ≤ i < n).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn select<T: Clone>(&self, items: &[T]) -> Vec<T> {
        items
            .iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// The file a shard writes its records to.
    pub fn file_name(&self) -> String {
        if self.count == 1 {
            "samples.jsonl".into()
        } else {
            format!("samples.shard-{}-of-{}.jsonl", self.index, self.count)
        }
    }
}

impl FromStr for Shard {
    type Err = GridError;
    fn from_str(s: &str) -> Result<Shard, GridError> {
        let bad = || {
            GridError(format!(
                "--shard '{s}': expected i/n with 0 <= i < n, e.g. 0/4"
            ))
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmerger_compression::{Options, Schedule};

    fn spec() -> GridSpec {
        GridSpec {
            methods: vec!["kvmerger".into(), "h2o:recent=0.1".into()],
            budgets: vec!["0.5".into(), "35%".into()],
            tasks: vec!["a".into(), "b".into()],
            lengths: vec![256, 512],
            samples: 3,
            ..Default::default()
        }
    }

    #[test]
    fn configs_are_full_then_each_method_at_each_budget() {
        let labels: Vec<_> = spec()
            .configs()
            .unwrap()
            .into_iter()
            .map(|c| c.label)
            .collect();
        assert_eq!(
            labels,
            [
                "full",
                "kvmerger@0.5",
                "kvmerger@35%",
                "h2o:recent=0.1@0.5",
                "h2o:recent=0.1@35%"
            ]
        );
    }

    #[test]
    fn shards_partition_the_items() {
        let items = spec().items();
        assert_eq!(items.len(), 2 * 2 * 3);
        let mut all: Vec<WorkItem> = (0..5)
            .flat_map(|i| Shard { index: i, count: 5 }.select(&items))
            .collect();
        all.sort();
        let mut expect = items.clone();
        expect.sort();
        assert_eq!(all, expect);
    }

    #[test]
    fn bad_grids_say_what_is_wrong() {
        let known = ["a", "b"];
        let mut s = spec();
        s.tasks.push("nope".into());
        assert!(s
            .validate(&known)
            .unwrap_err()
            .0
            .contains("unknown task 'nope'"));
        let mut s = spec();
        s.methods.push("zip".into());
        assert!(s
            .validate(&known)
            .unwrap_err()
            .0
            .contains("unknown compression method 'zip'"));
        let mut s = spec();
        s.methods = vec!["kvmerger:colour=red".into()];
        assert!(s.validate(&known).unwrap_err().0.contains("colour"));
        let mut s = spec();
        s.budgets = vec!["2.5".into()];
        assert!(s.validate(&known).is_err());
        assert!(GridSpec::from_toml("tasks = [\"a\"]\nbogus = 1").is_err());
        assert!("3/3".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
        assert_eq!(
            "1/3".parse::<Shard>().unwrap(),
            Shard { index: 1, count: 3 }
        );
    }

    #[test]
    fn a_method_may_carry_its_own_budgets_which_labels_do_not_repeat() {
        let g = GridSpec {
            methods: vec![
                "kvzip:budgets=0.75/0.125".into(),
                "snapkv:window=16,budgets=0.25,protocol=aware".into(),
                "h2o".into(),
            ],
            budgets: vec!["0.5".into()],
            ..spec()
        };
        let c: Vec<(String, String)> = g
            .configs()
            .unwrap()
            .into_iter()
            .map(|c| (c.label, c.budget_label))
            .collect();
        let want = [
            ("full", "1"),
            ("kvzip@0.75", "0.75"),
            ("kvzip@0.125", "0.125"),
            ("snapkv:window=16,protocol=aware@0.25", "0.25"),
            ("h2o@0.5", "0.5"),
        ];
        assert_eq!(c, want.map(|(a, b)| (a.to_string(), b.to_string())));
        assert!(parse_method("kvzip:budgets=2.5").is_err());
        assert!(parse_method("kvzip:budgets=").is_err());
    }

    #[test]
    fn method_specs_take_a_layer_schedule() {
        let r = parse_method("kvmerger:schedule=pyramid:0.25")
            .unwrap()
            .recipe;
        assert_eq!(r.method, "kvmerger");
        assert_eq!(r.options, Options::new());
        assert_eq!(r.schedule, Schedule::Pyramid { beta: 0.25 });
        let r = parse_method("h2o:recent=0.1,schedule=uniform")
            .unwrap()
            .recipe;
        assert_eq!(r.options.get("recent"), Some("0.1"));
        assert_eq!(r.schedule, Schedule::Uniform);
        assert_eq!(
            parse_method("h2o").unwrap().recipe.schedule,
            Schedule::Uniform
        );
        // The recipe's own keys are read too; the budget is the grid's.
        let r = parse_method("snapkv:prefill_chunk=256,recompress_margin=8")
            .unwrap()
            .recipe;
        assert_eq!((r.prefill_chunk, r.recompress_margin), (Some(256), Some(8)));
        assert!(parse_method("snapkv:budget=0.5").is_err());
        assert!(parse_method("kvzip:prefill_chunk=256")
            .unwrap_err()
            .0
            .contains("reconstruction"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ratios.csv");
        std::fs::write(&file, "# measured\nlayer,ratio\n0,0.5\n1,0.25\n2,0.75\n").unwrap();
        let written = format!("kvmerger:schedule={}", file.display());
        let sched = parse_method(&written).unwrap().recipe.schedule;
        assert_eq!(sched, Schedule::File(vec![0.5, 0.25, 0.75]));
        // The schedule reaches the configuration, and the label keeps the spec as written.
        let g = GridSpec {
            methods: vec![written.clone()],
            budgets: vec!["0.5".into()],
            ..spec()
        };
        let c = &g.configs().unwrap()[1];
        assert_eq!(c.label, format!("{written}@0.5"));
        assert_eq!(c.recipe.schedule, Schedule::File(vec![0.5, 0.25, 0.75]));
        assert_eq!(c.recipe.budget, Some(Budget::Fraction(0.5)));

        let missing = dir.path().join("missing.csv");
        let e = parse_method(&format!("kvmerger:schedule={}", missing.display()))
            .unwrap_err()
            .0;
        assert!(e.contains("neither uniform, pyramid"), "{e}");
        std::fs::write(&file, "0.5\nlots\n").unwrap();
        let e = parse_method(&format!("kvmerger:schedule={}", file.display()))
            .unwrap_err()
            .0;
        assert!(e.contains("schedule file") && e.contains("line 2"), "{e}");
        let e = parse_method("kvmerger:schedule=pyramid:2").unwrap_err().0;
        assert!(e.contains("[0, 1]"), "{e}");
        let e = parse_method("kvmerger:schedule=pyramid:x").unwrap_err().0;
        assert!(e.contains("not a number"), "{e}");
    }
}
