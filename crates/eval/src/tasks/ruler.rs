//! RULER's synthetic tasks: needle in a haystack (8 variants), variable tracking,
//! common and frequent words extraction, and QA with distractor documents.
//!
//! The logic follows RULER's generators (NIAH, variable tracking, common/frequent
//! words extraction and QA scripts); the task templates and answer prefixes are
//! RULER's own text (its task constants), reproduced verbatim, misspellings included,
//! because they define the benchmark. Deviations:
//!
//! - Word keys (`adjective-noun` from `wonderwords` in RULER) are pairs of words from
//!   the essay vocabulary ([`super::data::vocabulary`]); CWE's words come from the same
//!   list.
//! - Needle depths: see [`super::DEPTHS`]. RULER puts a needle at depth `d` before
//!   sentence `floor(d * sentences)` (essays) or in a random slot (other haystacks);
//!   here it goes to the sentence boundary nearest to fraction `d` of the haystack's
//!   bytes, so the recorded depth is close to the asked one in every haystack. The
//!   other needles of a sample go to depths drawn from RULER's 40.
//! - Essay sentences are split by a small rule-based splitter instead of NLTK Punkt.
//! - FWE fits `length - 50` like every other task (RULER fits its input to the whole
//!   length and only then adds the 50 tokens to generate).
//! - VT and CWE worked examples are joined to the question with single spaces where
//!   RULER's string concatenation doubles or omits one.

use std::collections::HashSet;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use super::data::{Essay, QaSet};
use super::util::{uuid4, LazyPerm};
use super::{Ctx, Error, DEPTHS};
use crate::sample::{Metric, Sample};

/// RULER's noise: the repeated haystack of `niah_single_1` and of variable tracking.
pub(crate) const NOISE: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

/// Largest haystack size tried for unbounded haystacks.
const UNBOUNDED: usize = 50_000_000;

/// RULER's needle depths in percent: `round(linspace(0, 100, 40))`.
fn ruler_depth(k: usize) -> f64 {
    (k as f64 * 100.0 / 39.0).round() / 100.0
}

pub(crate) fn generate(ctx: &Ctx) -> Result<Sample, Error> {
    match ctx.task {
        "vt" => vt(ctx),
        "cwe" => cwe(ctx),
        "fwe" => fwe(ctx),
        "qa_1" => qa(ctx, "squad"),
        "qa_2" => qa(ctx, "hotpotqa"),
        t => niah(ctx, niah_spec(t)),
    }
}

// ---------------------------------------------------------------------------------
// Needle in a haystack

#[derive(Clone, Copy, PartialEq, Debug)]
enum Hay {
    Repeat,
    Essay,
    Needles,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Words,
    Numbers,
    Uuids,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Words => "words",
            Kind::Numbers => "numbers",
            Kind::Uuids => "uuids",
        }
    }
    fn singular(self) -> &'static str {
        let p = self.plural();
        &p[..p.len() - 1]
    }
    fn draw(self, rng: &mut ChaCha8Rng, vocab: &[String]) -> String {
        match self {
            Kind::Words => {
                let a = rng.gen_range(0..vocab.len());
                let mut b = rng.gen_range(0..vocab.len() - 1);
                if b >= a {
                    b += 1;
                }
                format!("{}-{}", vocab[a], vocab[b])
            }
            Kind::Numbers => rng.gen_range(1_000_000..=9_999_999u32).to_string(),
            Kind::Uuids => uuid4(rng),
        }
    }
}

struct Spec {
    hay: Hay,
    k: Kind,
    v: Kind,
    num_k: usize,
    num_v: usize,
    num_q: usize,
}

/// RULER's `synthetic.yaml` NIAH variants.
fn niah_spec(task: &str) -> Spec {
    use Hay::*;
    use Kind::*;
    let s = |hay, k, v, num_k, num_v, num_q| Spec {
        hay,
        k,
        v,
        num_k,
        num_v,
        num_q,
    };
    match task {
        "niah_single_1" => s(Repeat, Words, Numbers, 1, 1, 1),
        "niah_single_2" => s(Essay, Words, Numbers, 1, 1, 1),
        "niah_single_3" => s(Essay, Words, Uuids, 1, 1, 1),
        "niah_multikey_1" => s(Essay, Words, Numbers, 4, 1, 1),
        "niah_multikey_2" => s(Needles, Words, Numbers, 1, 1, 1),
        "niah_multikey_3" => s(Needles, Uuids, Uuids, 1, 1, 1),
        "niah_multivalue" => s(Essay, Words, Numbers, 1, 4, 1),
        "niah_multiquery" => s(Essay, Words, Numbers, 1, 1, 4),
        other => unreachable!("not a NIAH task: {other}"),
    }
}

fn needle_text(v: Kind, key: &str, value: &str) -> String {
    format!(
        "One of the special magic {} for {key} is: {value}.",
        v.plural()
    )
}

/// `a`, `a, and b`, `a, b, and c` as RULER joins asked keys.
fn join_keys(keys: &[String]) -> String {
    match keys {
        [one] => one.clone(),
        [init @ .., last] => format!("{}, and {last}", init.join(", ")),
        [] => String::new(),
    }
}

/// Where the needles go: `(fraction 0..1, needle index)`, the answer needle first.
type Placement = Vec<(f64, usize)>;

/// Builds a context of `units` (joined by `sep`) with each needle at the unit
/// boundary nearest to its fraction of the haystack's bytes; returns it with each
/// needle's byte offset.
fn place(
    units: &[&str],
    sep: &str,
    needles: &[String],
    at: &Placement,
) -> (String, Vec<(usize, usize)>) {
    let n = units.len();
    // before[j]: bytes of the units before boundary j.
    let mut before = Vec::with_capacity(n + 1);
    let mut total = 0usize;
    before.push(0);
    for u in units {
        total += u.len() + sep.len();
        before.push(total);
    }
    let slot = |f: f64| -> usize {
        let goal = f.clamp(0.0, 1.0) * total as f64;
        let j = before.partition_point(|&b| (b as f64) < goal).min(n);
        if j > 0 && goal - before[j - 1] as f64 <= before[j] as f64 - goal {
            j - 1
        } else {
            j
        }
    };
    let mut slots: Vec<(usize, usize, usize)> = at
        .iter()
        .enumerate()
        .map(|(order, &(f, i))| (slot(f), order, i))
        .collect();
    slots.sort();
    let mut out = String::new();
    let mut offsets = Vec::with_capacity(slots.len());
    let mut s = slots.iter().peekable();
    for u in 0..=n {
        while let Some(&&(pos, _, i)) = s.peek() {
            if pos != u {
                break;
            }
            if !out.is_empty() {
                out.push_str(sep);
            }
            offsets.push((i, out.len()));
            out.push_str(&needles[i]);
            s.next();
        }
        if let Some(unit) = units.get(u) {
            if !out.is_empty() {
                out.push_str(sep);
            }
            out.push_str(unit);
        }
    }
    (out, offsets)
}

/// The sentences of the first `n` words of the essay haystack, each as one string.
fn essay_sentences(essay: &Essay, n: usize) -> Vec<String> {
    let mut sents = Vec::new();
    let mut cur = String::new();
    for i in 0..n {
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(essay.word(i));
        if i + 1 == n || essay.ends_sentence[i % essay.words.len()] {
            sents.push(std::mem::take(&mut cur));
        }
    }
    sents
}

fn niah(ctx: &Ctx, spec: Spec) -> Result<Sample, Error> {
    const MAX_NEW: usize = 128;
    let budget = ctx.budget(MAX_NEW)?;
    let need_essay = spec.hay == Hay::Essay || spec.k == Kind::Words || spec.v == Kind::Words;
    let essay = if need_essay {
        Some(ctx.data.essay()?)
    } else {
        None
    };
    let vocab: &[String] = essay.as_ref().map_or(&[], |e| &e.vocab);

    let num_k = spec.num_k.max(spec.num_q);
    let nd = niah_needles(ctx, &spec, vocab);
    let Needles {
        keys,
        needles,
        query,
        placement,
        ..
    } = &nd;
    // Distractor needles of the needle haystack: their own stream, never a real key.
    let real_keys: HashSet<String> = keys.iter().cloned().collect();
    let distractors = |n: usize| -> Vec<String> {
        let mut r = ctx.rng(1);
        (0..n)
            .map(|_| loop {
                let k = spec.k.draw(&mut r, vocab);
                if !real_keys.contains(&k) {
                    return needle_text(spec.v, &k, &spec.v.draw(&mut r, vocab));
                }
            })
            .collect()
    };

    let (head, tail, answer_prefix) = niah_template(&spec, query);

    let build = |n: usize| -> (String, Vec<(usize, usize)>) {
        match spec.hay {
            Hay::Repeat => place(&vec![NOISE; n], "\n", needles, placement),
            Hay::Needles => {
                let d = distractors(n);
                let units: Vec<&str> = d.iter().map(String::as_str).collect();
                place(&units, "\n", needles, placement)
            }
            Hay::Essay => {
                let e = essay.as_ref().expect("essay loaded");
                let sents = essay_sentences(e, n);
                let units: Vec<&str> = sents.iter().map(String::as_str).collect();
                place(&units, " ", needles, placement)
            }
        }
    };
    let fitted = ctx.fit(ctx.task, ctx.cfg.length, 1, UNBOUNDED, budget, |n| {
        let (context, offsets) = build(n);
        let input = format!("{head}{context}{tail}");
        let tokens = ctx.count(&format!("{input}{answer_prefix}"));
        Ok(((input, context.len(), offsets), tokens))
    })?;
    let (input, context_len, offsets) = fitted.out;
    let extra = niah_extra(&spec, &nd, num_k, &head, context_len, &offsets, fitted.n);
    Ok(ctx.sample(
        input,
        answer_prefix,
        nd.answers,
        Metric::StringMatchAll,
        MAX_NEW,
        fitted.tokens,
        fitted.n,
        extra,
    ))
}

/// The keys, values and needles of a NIAH sample, and where the needles go.
struct Needles {
    keys: Vec<String>,
    needles: Vec<String>,
    asked: Vec<usize>,
    answers: Vec<String>,
    query: String,
    answer_needle: usize,
    depth_target: f64,
    placement: Placement,
}

/// Draws the keys, values and needles of a NIAH sample and their placement.
fn niah_needles(ctx: &Ctx, spec: &Spec, vocab: &[String]) -> Needles {
    let mut rng = ctx.rng(0);
    let num_k = spec.num_k.max(spec.num_q);
    let mut used = HashSet::new();
    let mut fresh = |kind: Kind, rng: &mut ChaCha8Rng| loop {
        let x = kind.draw(rng, vocab);
        if used.insert(x.clone()) {
            return x;
        }
    };
    let keys: Vec<String> = (0..num_k).map(|_| fresh(spec.k, &mut rng)).collect();
    let values: Vec<Vec<String>> = (0..num_k)
        .map(|_| (0..spec.num_v).map(|_| fresh(spec.v, &mut rng)).collect())
        .collect();
    let mut needles = Vec::new(); // texts, by (key, value) in order
    let mut needle_of = vec![vec![0; spec.num_v]; num_k];
    for (ki, vs) in values.iter().enumerate() {
        for (vi, v) in vs.iter().enumerate() {
            needle_of[ki][vi] = needles.len();
            needles.push(needle_text(spec.v, &keys[ki], v));
        }
    }
    let asked: Vec<usize> = rand::seq::index::sample(&mut rng, num_k, spec.num_q).into_vec();
    let answers: Vec<String> = asked.iter().flat_map(|&k| values[k].clone()).collect();
    let query = join_keys(&asked.iter().map(|&k| keys[k].clone()).collect::<Vec<_>>());
    let answer_needle = needle_of[asked[0]][0];
    let depth_target = DEPTHS[ctx.index % DEPTHS.len()];
    let others: Vec<usize> = (0..needles.len()).filter(|&i| i != answer_needle).collect();
    let other_depths = rand::seq::index::sample(&mut rng, 40, others.len()).into_vec();
    let mut placement: Placement = vec![(depth_target, answer_needle)];
    placement.extend(
        others
            .iter()
            .zip(&other_depths)
            .map(|(&i, &d)| (ruler_depth(d), i)),
    );
    Needles {
        keys,
        needles,
        asked,
        answers,
        query,
        answer_needle,
        depth_target,
        placement,
    }
}

/// The template around the haystack (RULER's, in its one-needle form when one value is
/// asked): the head, the tail and the answer prefix.
fn niah_template(spec: &Spec, query: &str) -> (String, String, String) {
    let one = spec.num_q * spec.num_v == 1;
    let t = if one {
        spec.v.singular()
    } else {
        spec.v.plural()
    };
    let (some, are, are_all) = if one {
        ("A", "is", "is")
    } else {
        ("Some", "are", "are all")
    };
    let head = format!(
        "{some} special magic {t} {are} hidden within the following text. Make sure to memorize it. I will quiz you about the {t} afterwards.\n"
    );
    let tail = format!(
        "\nWhat {are_all} the special magic {t} for {query} mentioned in the provided text?"
    );
    let answer_prefix =
        format!(" The special magic {t} for {query} mentioned in the provided text {are}");
    (head, tail, answer_prefix)
}

/// The sample's extra fields: needle depths and positions, needle counts and the keys.
fn niah_extra(
    spec: &Spec,
    nd: &Needles,
    num_k: usize,
    head: &str,
    context_len: usize,
    offsets: &[(usize, usize)],
    fitted_n: usize,
) -> Map<String, Value> {
    let Needles {
        keys,
        needles,
        asked,
        answer_needle,
        depth_target,
        ..
    } = nd;
    let rel = |off: usize| off as f64 / context_len.max(1) as f64;
    let depth = offsets
        .iter()
        .find(|(i, _)| *i == *answer_needle)
        .map(|&(_, o)| rel(o))
        .unwrap_or(*depth_target);
    let mut extra = Map::new();
    extra.insert("depth".into(), json!(depth));
    extra.insert("depth_target".into(), json!(depth_target));
    extra.insert(
        "needle_positions".into(),
        json!(offsets
            .iter()
            .map(|&(_, o)| head.len() + o)
            .collect::<Vec<_>>()),
    );
    extra.insert(
        "needle_depths".into(),
        json!(offsets.iter().map(|&(_, o)| rel(o)).collect::<Vec<_>>()),
    );
    extra.insert("num_needles".into(), json!(needles.len()));
    let haystack_needles = if spec.hay == Hay::Needles {
        fitted_n
    } else {
        0
    };
    extra.insert(
        "num_distractor_needles".into(),
        json!((num_k - spec.num_q) * spec.num_v + haystack_needles),
    );
    extra.insert(
        "keys".into(),
        Value::from(asked.iter().map(|&k| keys[k].clone()).collect::<Vec<_>>()),
    );
    extra
}

// ---------------------------------------------------------------------------------
// Variable tracking

struct Chain {
    vars: Vec<String>,
    value: u32,
    lines: Vec<String>,
    /// Sorted fractions 0..1 where the lines go.
    at: Vec<f64>,
}

fn chain(rng: &mut ChaCha8Rng, letters: usize, hops: usize) -> Chain {
    let mut vars: Vec<String> = Vec::new();
    while vars.len() < hops + 1 {
        let v: String = (0..letters)
            .map(|_| rng.gen_range(b'A'..=b'Z') as char)
            .collect();
        if !vars.contains(&v) {
            vars.push(v);
        }
    }
    let value = rng.gen_range(10000..99999u32);
    let mut lines = vec![format!("VAR {} = {value}", vars[0])];
    for j in 0..hops {
        lines.push(format!("VAR {} = VAR {} ", vars[j + 1], vars[j]));
    }
    let mut at: Vec<f64> = (0..lines.len()).map(|_| rng.gen::<f64>()).collect();
    at.sort_by(f64::total_cmp);
    Chain {
        vars,
        value,
        lines,
        at,
    }
}

/// The noise context of `n` noise units with the chain's lines in it, joined as RULER
/// joins them; with the byte offset of the first line.
fn vt_context(c: &Chain, n: usize) -> (String, usize) {
    let noise = format!("{NOISE}\n");
    let units = vec![noise.as_str(); n];
    let placement: Placement = c.at.iter().copied().zip(0..).collect();
    let (context, offsets) = place(&units, " ", &c.lines, &placement);
    let first = offsets.iter().find(|(i, _)| *i == 0).map_or(0, |&(_, o)| o);
    // RULER tidies ". \n" to ".\n"; the offset of the first line can only move left.
    let before = context[..first].matches(". \n").count();
    (context.replace(". \n", ".\n"), first - before)
}

fn vt_question(context: &str, value: u32) -> String {
    format!(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\nQuestion: Find all variables that are assigned the value {value} in the text above."
    )
}

fn vt_prefix(num_v: usize, value: u32) -> String {
    format!(
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assgined the value {value}, they are: "
    )
}

fn vt(ctx: &Ctx) -> Result<Sample, Error> {
    const MAX_NEW: usize = 30;
    const HOPS: usize = 4;
    const ICL_LENGTH: usize = 500;
    let budget = ctx.budget(MAX_NEW)?;

    // The worked example: 3-letter variables, fitted to 500 tokens as RULER does.
    let icl = chain(&mut ctx.rng(1), 3, HOPS);
    let icl_prefix = vt_prefix(HOPS + 1, icl.value);
    let icl_fit = ctx.fit(
        "vt/example",
        ICL_LENGTH,
        1,
        UNBOUNDED,
        ICL_LENGTH - MAX_NEW,
        |n| {
            let text = vt_question(&vt_context(&icl, n).0, icl.value);
            let tokens = ctx.count(&format!("{text}{icl_prefix}"));
            Ok((text, tokens))
        },
    )?;
    let example = format!("{}{}{}", icl_fit.out, icl_prefix, icl.vars.join(" "));

    let c = chain(&mut ctx.rng(0), 5, HOPS);
    let answer_prefix = vt_prefix(HOPS + 1, c.value);
    let fitted = ctx.fit(ctx.task, ctx.cfg.length, 1, UNBOUNDED, budget, |n| {
        let (context, first) = vt_context(&c, n);
        let input = format!("{example}\n\n{}", vt_question(&context, c.value));
        let tokens = ctx.count(&format!("{input}{answer_prefix}"));
        Ok(((input, first as f64 / context.len().max(1) as f64), tokens))
    })?;
    let (input, depth) = fitted.out;
    let mut extra = Map::new();
    extra.insert("depth".into(), json!(depth));
    Ok(ctx.sample(
        input,
        answer_prefix,
        c.vars.clone(),
        Metric::StringMatchAll,
        MAX_NEW,
        fitted.tokens,
        fitted.n,
        extra,
    ))
}

// ---------------------------------------------------------------------------------
// Common words extraction

fn numbered(words: &[&str]) -> String {
    words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("{}. {w}", i + 1))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `num` words from the vocabulary (the first 10 common), repeated `common` and
/// `uncommon` times and shuffled; the numbered list and the common words.
fn cwe_list(
    vocab: &[String],
    pick: ChaCha8Rng,
    mut shuffle: ChaCha8Rng,
    num: usize,
    common: usize,
    uncommon: usize,
) -> (String, Vec<&str>) {
    let words: Vec<&str> = LazyPerm::new(vocab.len(), pick)
        .take(num)
        .map(|i| vocab[i].as_str())
        .collect();
    let (cw, ucw) = words.split_at(10.min(words.len()));
    let mut list: Vec<&str> = Vec::with_capacity(cw.len() * common + ucw.len() * uncommon);
    for _ in 0..common {
        list.extend_from_slice(cw);
    }
    for _ in 0..uncommon {
        list.extend_from_slice(ucw);
    }
    list.shuffle(&mut shuffle);
    (numbered(&list), cw.to_vec())
}

fn cwe_question(context: &str) -> String {
    format!(
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?"
    )
}

fn cwe(ctx: &Ctx) -> Result<Sample, Error> {
    const MAX_NEW: usize = 120;
    const PREFIX: &str = " Answer: The top 10 words that appear most often in the list are:";
    let budget = ctx.budget(MAX_NEW)?;
    let essay = ctx.data.essay()?;
    let vocab = &essay.vocab;
    // RULER's repetitions, smaller below 4096 tokens.
    let (ex_num, ex_cf, ex_ucf, cf, ucf) = if ctx.cfg.length < 4096 {
        (20, 3, 1, 6, 1)
    } else {
        (40, 10, 3, 30, 3)
    };
    let (ex_list, ex_answer) = cwe_list(vocab, ctx.rng(1), ctx.rng(2), ex_num, ex_cf, ex_ucf);
    let example = format!(
        "{}{PREFIX} {}",
        cwe_question(&ex_list),
        numbered(&ex_answer)
    );
    let fitted = ctx.fit(ctx.task, ctx.cfg.length, 11, vocab.len(), budget, |n| {
        let (list, answer) = cwe_list(vocab, ctx.rng(3), ctx.rng(4), n, cf, ucf);
        let input = format!("{example}\n{}", cwe_question(&list));
        let tokens = ctx.count(&format!("{input}{PREFIX}"));
        Ok(((input, answer), tokens))
    })?;
    let (input, answer) = fitted.out;
    Ok(ctx.sample(
        input,
        PREFIX.to_string(),
        answer.into_iter().map(str::to_string).collect(),
        Metric::StringMatchAll,
        MAX_NEW,
        fitted.tokens,
        fitted.n,
        Map::new(),
    ))
}

// ---------------------------------------------------------------------------------
// Frequent words extraction

fn fwe(ctx: &Ctx) -> Result<Sample, Error> {
    const MAX_NEW: usize = 50;
    const PREFIX: &str =
        " Answer: According to the coded text above, the three most frequently appeared words are:";
    const ALPHA: f64 = 2.0;
    let budget = ctx.budget(MAX_NEW)?;
    // RULER: a vocabulary of length/50 random 6-letter words; the top-ranked one is
    // replaced by "..." as noise, and the answer is ranks 2 to 4.
    let size = (ctx.cfg.length / 50).max(5);
    let mut rng = ctx.rng(0);
    let mut seen = HashSet::new();
    let mut vocab: Vec<String> = Vec::with_capacity(size);
    while vocab.len() < size {
        let w: String = (0..6).map(|_| rng.gen_range(b'a'..=b'z') as char).collect();
        if seen.insert(w.clone()) {
            vocab.push(w);
        }
    }
    vocab[0] = "...".to_string();
    let zeta: f64 = std::f64::consts::PI.powi(2) / 6.0; // ζ(2)
    let text = |n: usize| -> String {
        let mut words: Vec<&str> = Vec::new();
        for (k, w) in vocab.iter().enumerate() {
            let c = (n as f64 * ((k + 1) as f64).powf(-ALPHA) / zeta) as usize;
            words.extend(std::iter::repeat_n(w.as_str(), c));
        }
        words.shuffle(&mut ctx.rng(1));
        format!(
            "Read the following coded text and track the frequency of each coded word. Find the three most frequently appeared coded words. {}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",
            words.join(" ")
        )
    };
    let fitted = ctx.fit(ctx.task, ctx.cfg.length, 32, UNBOUNDED, budget, |n| {
        let input = text(n);
        let tokens = ctx.count(&format!("{input}{PREFIX}"));
        Ok((input, tokens))
    })?;
    Ok(ctx.sample(
        fitted.out,
        PREFIX.to_string(),
        vocab[1..4].to_vec(),
        Metric::StringMatchAll,
        MAX_NEW,
        fitted.tokens,
        fitted.n,
        Map::new(),
    ))
}

// ---------------------------------------------------------------------------------
// QA

/// The documents of a QA sample with `n` documents: the question's own, then its
/// preferred distractors, then random ones (RULER's order of preference), shuffled.
fn qa_docs(ctx: &Ctx, set: &QaSet, q: usize, n: usize) -> Vec<usize> {
    let q = &set.questions[q];
    let mut docs = q.context.clone();
    let k = n.saturating_sub(docs.len());
    if k > q.more.len() {
        docs.extend(&q.more);
        let exclude: HashSet<usize> = docs.iter().copied().collect();
        docs.extend(
            LazyPerm::new(set.docs.len(), ctx.rng(2))
                .filter(|d| !exclude.contains(d))
                .take(k - q.more.len()),
        );
    } else {
        docs.extend(
            LazyPerm::new(q.more.len(), ctx.rng(1))
                .take(k)
                .map(|i| q.more[i]),
        );
    }
    docs.shuffle(&mut ctx.rng(0));
    docs
}

fn qa(ctx: &Ctx, dataset: &str) -> Result<Sample, Error> {
    const MAX_NEW: usize = 32;
    const PREFIX: &str = " Answer:";
    let budget = ctx.budget(MAX_NEW)?;
    let set = if dataset == "squad" {
        ctx.data.squad()?
    } else {
        ctx.data.hotpot()?
    };
    if set.questions.is_empty() {
        return Err(Error::Data {
            path: ctx.data.dir.clone(),
            message: format!("no {dataset} questions"),
        });
    }
    // As RULER, questions in file order: sample i asks question i.
    let qi = ctx.index % set.questions.len();
    let q = &set.questions[qi];
    let question = |context: &str| {
        format!(
            "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {}",
            q.query
        )
    };
    let min = q.context.len().max(1);
    let fitted = ctx.fit(ctx.task, ctx.cfg.length, min, set.docs.len(), budget, |n| {
        let docs = qa_docs(ctx, &set, qi, n);
        let mut context = String::new();
        let mut offsets = Vec::with_capacity(docs.len());
        for (i, &d) in docs.iter().enumerate() {
            if i > 0 {
                context.push_str("\n\n");
            }
            offsets.push(context.len());
            context.push_str(&format!("Document {}:\n{}", i + 1, set.docs[d]));
        }
        let input = question(&context);
        let tokens = ctx.count(&format!("{input}{PREFIX}"));
        Ok(((input, docs, offsets, context.len()), tokens))
    })?;
    let (input, docs, offsets, context_len) = fitted.out;
    let gold: Vec<usize> = (0..docs.len())
        .filter(|&i| q.gold.contains(&docs[i]))
        .collect();
    let mut extra = Map::new();
    extra.insert("dataset".into(), json!(dataset));
    extra.insert("question_index".into(), json!(qi));
    extra.insert(
        "gold_documents".into(),
        json!(gold.iter().map(|i| i + 1).collect::<Vec<_>>()),
    );
    if let Some(&first) = gold.first() {
        extra.insert(
            "depth".into(),
            json!(offsets[first] as f64 / context_len.max(1) as f64),
        );
    }
    Ok(ctx.sample(
        input,
        PREFIX.to_string(),
        q.answers.clone(),
        Metric::StringMatchPart,
        MAX_NEW,
        fitted.tokens,
        fitted.n,
        extra,
    ))
}
