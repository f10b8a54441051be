// Scratch diagnostic (not committed): how well do scorers predict the question's attention?
use kvmerger_compression::{
    registry, HeadInput, HeadPos, KvDtype, Options, QueryNeeds, StatsNeeds,
};
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sequence::Sequence;

fn main() {
    let path = std::env::args().nth(1).unwrap();
    let lm = LoadedModel::open(std::path::Path::new(&path)).unwrap();
    let mut ctx = String::new();
    for i in 0..60 {
        ctx.push_str("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ");
        if i == 20 {
            ctx.push_str("One of the special magic numbers for lucky-dog is: 3847251. ");
        }
    }
    let q = "What is the special magic number for lucky-dog mentioned in the provided text?";
    let split = lm
        .split_prompt(
            &format!("{ctx}\n"),
            q,
            " The special magic number for lucky-dog mentioned in the provided text is",
            true,
        )
        .unwrap();
    let needs = StatsNeeds {
        queries: Some(QueryNeeds {
            future: 512,
            sinks: 4,
        }),
        window: Some(64),
        ..Default::default()
    };
    let mut seq = Sequence::new(&lm.model, KvDtype::F32, needs);
    seq.protect(split.prefix);
    seq.feed(&lm.model, &split.context).unwrap();
    let n = split.context.len();
    seq.score_reconstruction(&lm.model, &lm.repeat_prompts().unwrap())
        .unwrap();
    let mut full = seq.clone();
    full.feed(&lm.model, &split.question).unwrap();
    let qn = split.question.len();
    let nl = lm.model.cfg.n_layers;
    let nkv = lm.model.cfg.n_kv_heads;
    // the needle positions: tokens of "3847251"
    let ea = registry::build("expected_attention", &Options::new()).unwrap();
    let kd = registry::build("keydiff", &Options::new()).unwrap();
    let kz = registry::build("kvzip", &Options::new()).unwrap();
    let mut tot = [0.0f64; 3];
    let budget = n / 2;
    for (k, m) in [&ea, &kd, &kz].iter().enumerate() {
        let mut c = kvmerger_engine::compress::Compressor::new(
            m.name(),
            &Options::new(),
            kvmerger_compression::Budget::Tokens(budget),
            kvmerger_compression::Schedule::Uniform,
        )
        .unwrap();
        c.recompress_margin = None;
        let mut s2 = seq.clone();
        s2.compress(&c).unwrap();
        for l in 0..nl {
            for g in 0..nkv {
                let actual = full.stats.window(l, g, qn, n + qn).unwrap();
                let actual = &actual[..n];
                let kept: Vec<u32> = s2.cache.layers[l][g]
                    .meta()
                    .iter()
                    .map(|x| x.position)
                    .collect();
                let mass: f32 = kept.iter().map(|&p| actual[p as usize]).sum::<f32>()
                    / actual.iter().sum::<f32>();
                tot[k] += mass as f64;
            }
        }
    }
    let nh = (nl * nkv) as f64;
    println!("context {n} tokens; share of the question's attention kept at 50%: expected_attention {:.3} keydiff {:.3} kvzip {:.3}", tot[0]/nh, tot[1]/nh, tot[2]/nh);
    let _ = (data_unused(), HeadInput::clone, HeadPos::clone);
}
fn data_unused() {}
fn top(x: &[f32], k: usize) -> Vec<usize> {
    let mut i: Vec<usize> = (0..x.len()).collect();
    i.sort_by(|a, b| x[*b].total_cmp(&x[*a]));
    i.truncate(k);
    i
}
