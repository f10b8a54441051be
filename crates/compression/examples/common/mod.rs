//! What the hand-run examples share: the method variants they compare, where the head
//! sits, and the normal draws their synthetic heads are made of.

use kvmerger_compression::{registry, HeadPos, Method, Options};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// A standard normal draw (Box-Muller).
pub fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u: f32 = rng.gen_range(1e-7..1.0);
    let v: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// Layer 5 of a 30-layer model with `n_kv_heads` KV heads (its first).
pub fn mid_layer(n_kv_heads: usize) -> HeadPos {
    HeadPos {
        layer: 5,
        n_layers: 30,
        kv_head: 0,
        n_kv_heads,
    }
}

/// The method `name` with the options `pairs`, and its label in a table
/// (`kvmerger mode=paper`).
pub fn variant(name: &str, pairs: &[(&str, &str)]) -> (Box<dyn Method>, String) {
    let mut opts = Options::new();
    for (k, v) in pairs {
        opts.set(k, v);
    }
    let method = registry::build(name, &opts).unwrap();
    let label = format!(
        "{name} {}",
        pairs
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    (method, label)
}
