//! The harness on a real model: a grid interrupted and rerun gives the results of an
//! uninterrupted run; shards together give the whole grid; text tasks score perplexity
//! and fidelity with the full cache as the reference.

use kvmerger_compression::KvDtype;
use kvmerger_engine::load::LoadedModel;
use kvmerger_eval::grid::{GridSpec, Shard, WorkItem};
use kvmerger_eval::records::{self, Record};
use kvmerger_eval::runner::{Observer, Quiet, Runner, TextSource};
use kvmerger_eval::sources::TaskSamples;
use std::cell::Cell;
use std::path::{Path, PathBuf};

fn fetch(id: &str) -> PathBuf {
    let dir = kvmerger_assets::data_dir(None);
    kvmerger_assets::fetch(id, &dir, &kvmerger_assets::NoProgress)
        .unwrap_or_else(|e| panic!("could not fetch {id}: {e}"))
}

fn model() -> LoadedModel {
    LoadedModel::open(&fetch("smollm2-135m")).unwrap()
}

fn spec() -> GridSpec {
    GridSpec {
        methods: vec!["kvmerger".into(), "h2o".into()],
        budgets: vec!["0.5".into()],
        tasks: vec!["niah_single_1".into(), "passkey".into()],
        lengths: vec![384],
        samples: 2,
        ..Default::default()
    }
}

/// Stops the run after `n` items.
struct StopAfter {
    left: Cell<usize>,
}
impl Observer for StopAfter {
    fn keep_going(&self) -> bool {
        self.left.get() > 0
    }
    fn item_done(&self, _: &WorkItem, _: &[Record]) {
        self.left.set(self.left.get() - 1);
    }
}

/// A runner on smollm2 with f16 KV.
fn runner<'a>(
    lm: &'a LoadedModel,
    spec: &'a GridSpec,
    samples: &'a TaskSamples,
    text: Option<&'a TextSource>,
) -> Runner<'a> {
    Runner {
        lm,
        dtype: KvDtype::F16,
        run: "smollm2".into(),
        spec,
        samples,
        text,
    }
}

fn results(dir: &Path) -> Vec<Record> {
    let c = records::collect(&[dir.to_path_buf()]).unwrap();
    assert!(c.bad.is_empty() && c.conflicts.is_empty());
    c.records.iter().map(Record::without_timing).collect()
}

#[test]
fn an_interrupted_grid_rerun_gives_identical_results_and_shards_merge_to_the_whole() {
    let lm = model();
    let spec = spec();
    // The grid, written to `out`, for as long as `obs` lets it go on.
    let run = |out: &Path, shard: Shard, obs: &dyn Observer| {
        let src = TaskSamples::new(&lm, fetch("ruler"), spec.seed);
        runner(&lm, &spec, &src, None).run(out, shard, obs).unwrap()
    };
    let whole = tempfile::tempdir().unwrap();
    let s = run(whole.path(), Shard::WHOLE, &Quiet);
    assert_eq!((s.items, s.evaluated, s.skipped), (4, 4, 0));
    let reference = results(whole.path());
    // Every sample has all three configurations, and the needle was found with the full cache.
    assert_eq!(reference.len(), 4 * 3);
    assert!(reference
        .iter()
        .filter(|r| r.config == "full")
        .all(|r| r.score.is_some()));
    assert!(reference.iter().all(|r| r.kv_bytes <= r.kv_bytes_full));
    assert!(reference
        .iter()
        .filter(|r| r.config != "full")
        .all(|r| r.kv_ratio() < 0.6));

    // Interrupted after one sample, with a torn line as if killed mid-write, then rerun.
    let resumed = tempfile::tempdir().unwrap();
    let s = run(
        resumed.path(),
        Shard::WHOLE,
        &StopAfter { left: Cell::new(1) },
    );
    assert!(s.stopped_early);
    assert_eq!(s.evaluated, 1);
    let file = resumed.path().join("samples.jsonl");
    let mut text = std::fs::read_to_string(&file).unwrap();
    text.push_str("{\"run\":\"smollm2\",\"task\":\"pass");
    std::fs::write(&file, text).unwrap();
    let s = run(resumed.path(), Shard::WHOLE, &Quiet);
    assert_eq!((s.items, s.skipped, s.evaluated), (4, 1, 3));
    assert_eq!(results(resumed.path()), reference);
    // A third run has nothing left to do.
    let s = run(resumed.path(), Shard::WHOLE, &Quiet);
    assert_eq!((s.skipped, s.evaluated), (4, 0));

    // Two shards in two directories, merged, are the whole grid.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    run(a.path(), Shard { index: 0, count: 2 }, &Quiet);
    run(b.path(), Shard { index: 1, count: 2 }, &Quiet);
    let merged = records::collect(&[a.path().to_path_buf(), b.path().to_path_buf()]).unwrap();
    let merged: Vec<Record> = merged.records.iter().map(Record::without_timing).collect();
    assert_eq!(merged, reference);
}

#[test]
fn text_tasks_score_perplexity_and_fidelity_against_the_full_cache() {
    let lm = model();
    // A text with structure a model can predict: numbered sentences.
    let text: String = (0..400)
        .map(|i| format!("Line {i} of the list says that {i} plus one is {}. ", i + 1))
        .collect();
    let source = TextSource {
        documents: vec![("numbers".into(), text)],
    };
    let spec = GridSpec {
        methods: vec![
            "kvmerger".into(),
            "streaming".into(),
            "kvmerger:schedule=pyramid:0.9".into(),
            // Observation 2's measured schedule gives some layers fewer slots than
            // kvmerger+'s 32-slot window: those get the window, the others pay for it.
            format!(
                "kvmerger+:schedule={}/../../docs/analysis/smollm2-135m/sparsity_schedule.csv",
                env!("CARGO_MANIFEST_DIR")
            ),
        ],
        budgets: vec!["0.25".into()],
        tasks: vec!["ppl".into()],
        lengths: vec![256],
        samples: 1,
        ppl_tokens: 24,
        ..Default::default()
    };
    let src = TaskSamples::new(&lm, PathBuf::new(), 0);
    let runner = runner(&lm, &spec, &src, Some(&source));
    let dir = tempfile::tempdir().unwrap();
    runner.run(dir.path(), Shard::WHOLE, &Quiet).unwrap();
    let rs = results(dir.path());
    assert_eq!(rs.len(), 5);
    let full = rs.iter().find(|r| r.config == "full").unwrap();
    assert_eq!((full.kl, full.top1), (Some(0.0), Some(1.0)));
    let ppl = full.ppl.unwrap();
    assert!(
        ppl > 1.0 && ppl < 20.0,
        "a predictable text has low perplexity: {ppl}"
    );
    for r in rs.iter().filter(|r| r.config != "full") {
        let kl = r.kl.unwrap();
        assert!(kl > 0.0 && kl.is_finite(), "{}: KL {kl}", r.config);
        assert!((0.0..=1.0).contains(&r.top1.unwrap()));
        assert_eq!(r.meta["scored_tokens"], 24);
        assert!(r.kv_ratio() < 0.3);
    }
    // A layer schedule reaches the compressor: the same method and budget spread
    // unevenly over the layers gives other distributions.
    let kl = |c: &str| rs.iter().find(|r| r.config == c).unwrap().kl.unwrap();
    assert_ne!(
        kl("kvmerger@0.25"),
        kl("kvmerger:schedule=pyramid:0.9@0.25")
    );
}

#[test]
fn a_schedule_for_another_depth_is_refused_before_any_work() {
    let lm = model();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("three_layers.csv");
    std::fs::write(&file, "0.5\n1\n0.5\n").unwrap();
    let spec = GridSpec {
        methods: vec![format!("h2o:schedule={}", file.display())],
        ..spec()
    };
    let src = TaskSamples::new(&lm, fetch("ruler"), spec.seed);
    let runner = runner(&lm, &spec, &src, None);
    let out = dir.path().join("out");
    let e = runner
        .run(&out, Shard::WHOLE, &Quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("3 layers") && e.contains("has 30"), "{e}");
    assert!(!out.join("samples.jsonl").exists());
}
