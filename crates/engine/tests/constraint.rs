//! The decoder under a token constraint (what structured outputs plug into): only
//! allowed tokens are drawn, the constraint hears each one, the generation ends when
//! the constraint is complete, a failing constraint stops it with its reason, and a
//! forked decoder carries an independent copy.

mod common;

use common::model_path;
use kvmerger_engine::generate::{Decoder, GenerateParams, Step, StopReason, TokenConstraint};
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sampling::SamplingParams;

/// Allows exactly `script`, one token at a time, then only end-of-sequence.
#[derive(Clone)]
struct Script {
    script: Vec<u32>,
    at: usize,
    fail_at: Option<usize>,
}

impl TokenConstraint for Script {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        if self.fail_at == Some(self.at) {
            return Err(format!("refused at token {}", self.at));
        }
        let want = self.script[self.at] as usize;
        for (i, l) in logits.iter_mut().enumerate() {
            if i != want {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }
    fn accept(&mut self, token: u32) -> Result<(), String> {
        if token != self.script[self.at] {
            return Err(format!("token {token} was not allowed"));
        }
        self.at += 1;
        Ok(())
    }
    fn is_finished(&self) -> bool {
        self.at == self.script.len()
    }
    fn fork(&self) -> Box<dyn TokenConstraint> {
        Box::new(self.clone())
    }
}

/// Logits that make every token but the script's more likely.
fn adversarial(vocab: usize, avoid: &[u32]) -> Vec<f32> {
    (0..vocab)
        .map(|i| {
            if avoid.contains(&(i as u32)) {
                -10.0
            } else {
                10.0 + (i % 7) as f32
            }
        })
        .collect()
}

fn run(d: &mut Decoder<'_>, vocab: usize, avoid: &[u32]) -> (StopReason, String) {
    let mut text = String::new();
    for _ in 0..100 {
        let mut l = adversarial(vocab, avoid);
        match d.step(&mut l, &mut text) {
            Step::Token(_) => {}
            Step::Stop(r) => {
                d.finish(r, &mut text);
                return (r, text);
            }
        }
    }
    panic!("the decoder did not stop: {text:?}");
}

#[test]
fn a_constraint_decides_every_token_and_ends_the_generation() {
    let lm = LoadedModel::open(&model_path("smollm2-135m")).unwrap();
    let tok = &lm.tokenizer;
    let vocab = lm.model.cfg.vocab;
    let script = tok.encode(" yes please", false).unwrap();
    for temperature in [0.0, 1.0] {
        let params = GenerateParams {
            max_tokens: 50,
            sampling: SamplingParams {
                temperature,
                seed: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let c = Script {
            script: script.clone(),
            at: 0,
            fail_at: None,
        };
        let mut d = Decoder::new(tok, &[1], &params)
            .unwrap()
            .with_constraint(Box::new(c));
        let (reason, text) = run(&mut d, vocab, &script);
        assert_eq!(reason, StopReason::Eos, "temperature {temperature}");
        assert_eq!(text, " yes please");
        assert_eq!(d.tokens(), &script[..]);
    }
    // A fork starts afresh from the same state, with its own copy.
    let params = GenerateParams::default();
    let c = Script {
        script: script.clone(),
        at: 0,
        fail_at: None,
    };
    let parent = Decoder::new(tok, &[1], &params)
        .unwrap()
        .with_constraint(Box::new(c));
    let mut a = parent.fork(&[1], 7).unwrap();
    let mut b = parent.fork(&[1], 8).unwrap();
    assert_eq!(run(&mut a, vocab, &script).1, " yes please");
    assert_eq!(run(&mut b, vocab, &script).1, " yes please");
    // A constraint that fails stops the generation and says why.
    let c = Script {
        script: script.clone(),
        at: 0,
        fail_at: Some(1),
    };
    let mut d = Decoder::new(tok, &[1], &params)
        .unwrap()
        .with_constraint(Box::new(c));
    let (reason, _) = run(&mut d, vocab, &script);
    assert_eq!(reason, StopReason::Constraint);
    assert_eq!(d.constraint_error(), Some("refused at token 1"));
    assert_eq!(d.tokens().len(), 1);
    // Without a constraint the same logits give other tokens.
    let mut free = Decoder::new(
        tok,
        &[1],
        &GenerateParams {
            max_tokens: 3,
            ..Default::default()
        },
    )
    .unwrap();
    let (_, text) = run(&mut free, vocab, &script);
    assert_ne!(text, " yes please");
}
