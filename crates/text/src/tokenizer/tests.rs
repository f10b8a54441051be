use super::*;
use std::path::PathBuf;

/// A real test model, fetched by the project's own fetch code on first use.
fn model_path(id: &str) -> PathBuf {
    let dir = kvmerger_assets::data_dir(None);
    kvmerger_assets::fetch(id, &dir, &kvmerger_assets::NoProgress)
        .unwrap_or_else(|e| panic!("could not fetch test model {id}: {e}"))
}

/// The tokenizer of a real test model.
fn load(id: &str) -> Tokenizer {
    let path = model_path(id);
    let f = GgufFile::open(&path).expect("open gguf");
    Tokenizer::from_gguf(&f).expect("tokenizer from gguf")
}

const TRICKY: &[&str] = &[
    "The capital of France is",
    "Hello, world!",
    "héllo wörld ñ çà",
    "emoji 🎉🚀 family 👩\u{200d}👩\u{200d}👧 done",
    "中文字符测试，日本語のテキスト、한국어",
    "12345 and 3.14159 and 1,000,000",
    "line1\nline2\n\n\tindented\r\nwindows\n",
    "  multiple   spaces  ",
    "don't won't I'm we'll they'd DON'T",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<start_of_turn>model\n",
    "",
    " ",
    "\u{0}\u{1}\u{7f} controls",
    "mixed العربية русский ελληνικά हिन्दी",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
];

fn round_trip(tok: &Tokenizer) {
    for text in TRICKY {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(
            &tok.decode(&ids),
            text,
            "round trip of {text:?} via {ids:?}"
        );
        // Streaming gives the same text.
        let mut d = tok.detokenizer();
        let mut s: String = ids.iter().filter_map(|&id| d.push(id)).collect();
        s.extend(d.flush());
        assert_eq!(&s, text, "streamed {text:?}");
    }
}

// ---- synthetic vocabularies (no model files needed) ------------------------

fn s(v: &str) -> Value {
    Value::String(v.into())
}
fn strs(v: &[String]) -> Value {
    Value::Array(v.iter().map(|x| s(x)).collect())
}
fn ints(v: &[i32]) -> Value {
    Value::Array(v.iter().map(|&x| Value::I32(x)).collect())
}

/// A byte-level BPE vocabulary: `<|endoftext|>`, `<|im_start|>`, the 256 byte
/// characters, and a few merges.
fn tiny_bpe() -> Meta {
    let mut tokens = vec![
        "<|endoftext|>".to_string(),
        "<|im_start|>".to_string(),
        "<|im_end|>".to_string(),
    ];
    let mut types = vec![3, 3, 3];
    for c in bpe::byte_chars() {
        tokens.push(c.to_string());
        types.push(1);
    }
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d",
    ];
    for m in merges {
        tokens.push(m.replace(' ', ""));
        types.push(1);
    }
    let mut m = Meta::new();
    m.insert("tokenizer.ggml.model".into(), s("gpt2"));
    m.insert("tokenizer.ggml.pre".into(), s("smollm"));
    m.insert("tokenizer.ggml.tokens".into(), strs(&tokens));
    m.insert("tokenizer.ggml.token_type".into(), ints(&types));
    m.insert(
        "tokenizer.ggml.merges".into(),
        strs(&merges.map(String::from)),
    );
    m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    m.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
    m
}

/// A SentencePiece vocabulary with byte fallback.
fn tiny_spm(add_space_prefix: Option<bool>) -> Meta {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (t, sc) in [
        ("▁", -1.0),
        ("h", -2.0),
        ("i", -3.0),
        ("hi", -4.0),
        ("▁hi", -5.0),
        ("▁t", -9.0),
        ("e", -9.0),
    ] {
        tokens.push(t.into());
        types.push(1);
        scores.push(sc);
    }
    let mut m = Meta::new();
    m.insert("tokenizer.ggml.model".into(), s("llama"));
    m.insert("tokenizer.ggml.tokens".into(), strs(&tokens));
    m.insert("tokenizer.ggml.token_type".into(), ints(&types));
    m.insert(
        "tokenizer.ggml.scores".into(),
        Value::Array(scores.into_iter().map(Value::F32).collect()),
    );
    m.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(1));
    m.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(2));
    m.insert("tokenizer.ggml.unknown_token_id".into(), Value::U32(0));
    if let Some(p) = add_space_prefix {
        m.insert("tokenizer.ggml.add_space_prefix".into(), Value::Bool(p));
    }
    m
}

#[test]
fn tokenizer_tiny_bpe_encodes_with_merges_and_specials() {
    let tok = Tokenizer::from_metadata(&tiny_bpe()).unwrap();
    let id = |t: &str| tok.token_id(t).unwrap();
    let ids = tok.encode("hello world", false).unwrap();
    assert_eq!(ids, vec![id("hello"), id("Ġworld")]);
    let ids = tok.encode("<|im_start|>hello<|im_end|>", true).unwrap();
    assert_eq!(
        ids,
        vec![1, id("hello"), 2],
        "gpt2 models add no BOS by default"
    );
    // Without parse_special the marker is plain text.
    let ids = tok.encode_with("<|im_end|>", false, false).unwrap();
    assert!(ids.len() > 1 && !ids.contains(&2));
    assert_eq!(tok.decode(&ids), "<|im_end|>");
    // Digits split one by one (smollm).
    let ids = tok.encode("2024", false).unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(tok.stop_ids(), &[0, 2]);
    assert_eq!(tok.eot(), Some(2));
    assert!(tok.is_stop(0) && !tok.is_stop(1));
    round_trip(&tok);
    assert_eq!(tok.decode_skip_special(&[1, id("hello"), 2]), "hello");
}

#[test]
fn tokenizer_llama3_takes_whole_pretokens_that_are_tokens() {
    // "Ġworld" is a token; the merges alone build it too, but "hellohello"
    // (added below) has no merge path from "hello" + "hello".
    let mut m = tiny_bpe();
    let Some(Value::Array(tokens)) = m.get_mut("tokenizer.ggml.tokens") else {
        unreachable!()
    };
    tokens.push(s("hellohello"));
    let n = tokens.len();
    let Some(Value::Array(types)) = m.get_mut("tokenizer.ggml.token_type") else {
        unreachable!()
    };
    types.push(Value::I32(1));
    let whole = (n - 1) as u32;
    let tok = Tokenizer::from_metadata(&m).unwrap();
    let hello = tok.token_id("hello").unwrap();
    assert_eq!(tok.encode("hellohello", false).unwrap(), [hello, hello]);
    m.insert("tokenizer.ggml.pre".into(), s("llama-bpe"));
    let tok = Tokenizer::from_metadata(&m).unwrap();
    assert_eq!(tok.encode("hellohello", false).unwrap(), [whole]);
    // A pre-token that is no token still goes through the merges.
    assert_eq!(
        tok.encode("hellohellohello", false).unwrap().len(),
        3,
        "no token spells three hellos, so the merges make hello+hello+hello"
    );
    round_trip(&tok);
}

#[test]
fn tokenizer_tiny_spm_merges_by_score_with_byte_fallback() {
    let tok = Tokenizer::from_metadata(&tiny_spm(Some(false))).unwrap();
    let id = |t: &str| tok.token_id(t).unwrap();
    assert!(tok.adds_bos());
    // "hi hi": h+i -> "hi" (-4) beats ▁+h (absent); then "▁hi" (-5).
    let ids = tok.encode("hi hi", true).unwrap();
    assert_eq!(ids, vec![1, id("hi"), id("▁hi")]);
    // "é" has no token: two byte tokens.
    let ids = tok.encode("é", false).unwrap();
    assert_eq!(ids, vec![id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&ids), "é");
    // A BOS written in the text is not doubled.
    assert_eq!(tok.encode("<s>hi", true).unwrap(), vec![1, id("hi")]);
    round_trip(&tok);

    // With the space prefix (the default when the key is absent).
    let tok = Tokenizer::from_metadata(&tiny_spm(None)).unwrap();
    let ids = tok.encode("hi", false).unwrap();
    assert_eq!(ids, vec![id("▁hi")]);
    assert_eq!(tok.decode(&ids), "hi", "decode drops the added space");
    // Text after a special token gets the prefix too.
    let ids = tok.encode("<s>hi</s>hi", false).unwrap();
    assert_eq!(ids, vec![1, id("▁hi"), 2, id("▁hi")]);
    assert_eq!(tok.decode(&ids), "<s>hi</s> hi");
}

#[test]
fn tokenizer_detokenizer_holds_back_partial_utf8() {
    let tok = Tokenizer::from_metadata(&tiny_spm(Some(false))).unwrap();
    let ids = tok.encode("a🎉b", false).unwrap();
    let mut d = tok.detokenizer();
    let outs: Vec<Option<String>> = ids.iter().map(|&i| d.push(i)).collect();
    assert_eq!(outs[0].as_deref(), Some("a"));
    assert!(outs[1..5].iter().take(3).all(Option::is_none), "{outs:?}");
    assert_eq!(outs[4].as_deref(), Some("🎉"));
    assert_eq!(outs[5].as_deref(), Some("b"));
    assert_eq!(d.flush(), None);
    // A dangling lead byte comes out as U+FFFD on flush.
    let lead = tok.token_id("<0xF0>").unwrap();
    assert_eq!(d.push(lead), None);
    assert_eq!(d.flush().as_deref(), Some("\u{fffd}"));
    // Invalid bytes in the middle are replaced, not held.
    let cont = tok.token_id("<0x80>").unwrap();
    assert_eq!(d.push(cont).as_deref(), Some("\u{fffd}"));
    // Skipping control tokens.
    let mut d = tok.detokenizer().skip_special(true);
    assert_eq!(d.push(1), None);
    assert_eq!(tok.detokenizer().push(1).as_deref(), Some("<s>"));
}

#[test]
fn tokenizer_bad_metadata_errors_name_the_key() {
    let err = |m: &Meta| Tokenizer::from_metadata(m).unwrap_err().to_string();
    let mut m = tiny_bpe();
    m.remove("tokenizer.ggml.merges");
    assert!(err(&m).contains("tokenizer.ggml.merges"), "{}", err(&m));
    let mut m = tiny_bpe();
    m.remove("tokenizer.ggml.tokens");
    assert!(err(&m).contains("tokenizer.ggml.tokens"));
    let mut m = tiny_bpe();
    m.remove("tokenizer.ggml.model");
    assert!(err(&m).contains("tokenizer.ggml.model"));
    let mut m = tiny_bpe();
    m.insert("tokenizer.ggml.model".into(), s("t5"));
    assert!(err(&m).contains("'t5' is not supported"));
    let mut m = tiny_bpe();
    m.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1_000_000));
    assert!(err(&m).contains("eos_token_id"));
    let mut m = tiny_bpe();
    m.insert("tokenizer.ggml.token_type".into(), ints(&[1, 2]));
    assert!(err(&m).contains("token_type"));
    let mut m = tiny_bpe();
    m.insert("tokenizer.ggml.merges".into(), strs(&["nospace".into()]));
    assert!(err(&m).contains("merge 0"));
    let mut m = tiny_spm(None);
    m.remove("tokenizer.ggml.scores");
    assert!(err(&m).contains("tokenizer.ggml.scores"));
    let mut m = tiny_spm(None);
    m.insert("tokenizer.ggml.tokens".into(), Value::U32(3));
    assert!(err(&m).contains("tokenizer.ggml.tokens"));
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
    check::<crate::chat::ChatTemplate>();
}

#[test]
fn tokenizer_invalid_ids_are_skipped() {
    let tok = Tokenizer::from_metadata(&tiny_bpe()).unwrap();
    let hello = tok.token_id("hello").unwrap();
    assert_eq!(tok.decode(&[u32::MAX, hello, 999_999]), "hello");
    assert_eq!(tok.token_str(u32::MAX), None);
    assert_eq!(tok.detokenizer().push(u32::MAX), None);
}

#[cfg(feature = "hf-tokenizers")]
#[test]
fn tokenizer_json_errors_are_clear() {
    let dir = std::env::temp_dir().join(format!("kvmerger-tok-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("tokenizer.json");
    std::fs::write(&bad, "{\"not\": \"a tokenizer\"}").unwrap();
    let e = Tokenizer::from_tokenizer_json(&bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a valid tokenizer.json"), "{e}");
    let e = Tokenizer::from_tokenizer_json(&dir.join("missing.json"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.json"), "{e}");

    // A small valid one: word-level vocabulary with a special token.
    let json = r#"{"version":"1.0","truncation":null,"padding":null,
      "added_tokens":[{"id":0,"content":"<|endoftext|>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
      "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
      "model":{"type":"WordLevel","vocab":{"<|endoftext|>":0,"hello":1,"world":2,"[UNK]":3},"unk_token":"[UNK]"}}"#;
    std::fs::write(&bad, json).unwrap();
    let tok = Tokenizer::from_tokenizer_json(&bad).unwrap();
    assert_eq!(
        tok.encode("hello world<|endoftext|>", false).unwrap(),
        vec![1, 2, 0]
    );
    assert_eq!(tok.eos(), Some(0));
    assert!(tok.is_stop(0));
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(tok.token_str(2), Some("world"));
    assert_eq!(tok.decode(&[1, 77]), "hello");
    let mut d = tok.detokenizer();
    let streamed: String = [1, 2].iter().filter_map(|&i| d.push(i)).collect();
    assert!(
        streamed.contains("hello") && streamed.contains("world"),
        "{streamed}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

// ---- real models -----------------------------------------------------------

#[test]
fn tokenizer_smollm2_matches_reference_ids() {
    let tok = load("smollm2-135m");
    assert_eq!(tok.model_kind(), "gpt2");
    assert_eq!(tok.pre_tokenizer(), Some("digits+gpt2"));
    assert_eq!(
        tok.encode("The capital of France is", true).unwrap(),
        vec![504, 3575, 282, 4649, 314]
    );
    assert_eq!(tok.encode("<|im_start|>user", false).unwrap()[0], 1);
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert_eq!(tok.stop_ids(), &[0, 2]);
    assert_eq!(tok.vocab_size(), 49152);
    round_trip(&tok);
}

#[test]
fn tokenizer_qwen25_matches_reference_ids() {
    let tok = load("qwen2.5-0.5b");
    assert_eq!(tok.pre_tokenizer(), Some("qwen2"));
    assert_eq!(
        tok.encode("The capital of France is", true).unwrap(),
        vec![785, 6722, 315, 9625, 374]
    );
    assert_eq!(
        tok.encode("<|im_start|>user\n", false).unwrap(),
        vec![151644, 872, 198]
    );
    assert_eq!(tok.eot(), Some(151645));
    assert!(tok.is_stop(151643) && tok.is_stop(151645));
    round_trip(&tok);
}

#[test]
fn tokenizer_gemma3_matches_reference_ids() {
    let tok = load("gemma3-270m");
    assert_eq!(tok.model_kind(), "llama");
    // Cross-checked against SentencePiece run on this vocabulary.
    assert_eq!(
        tok.encode("The capital of France is", true).unwrap(),
        vec![2, 818, 5279, 529, 7001, 563]
    );
    assert_eq!(tok.eos(), Some(1));
    assert_eq!(tok.eot(), Some(106));
    assert!(tok.is_stop(1) && tok.is_stop(106));
    let ids = tok
        .encode("<start_of_turn>user\nHi<end_of_turn>\n", false)
        .unwrap();
    assert_eq!(ids, vec![105, 2364, 107, 10979, 106, 107]);
    // User-defined whitespace tokens are matched before the model runs.
    assert_eq!(tok.encode("\n\n", false).unwrap(), vec![108]);
    assert_eq!(tok.encode("a  b", false).unwrap()[1], 138);
    round_trip(&tok);
}

/// About 50k characters of mixed prose, code and numbers.
fn long_text() -> String {
    let para = "In 1887, the engineers of the Compagnie des Établissements Eiffel began assembling \
                the tower's 18,038 wrought-iron parts; it opened on 31 March 1889. Ça marche très bien! \
                Le café coûte 2,50 €. 东京是日本的首都。 fn add(a: i32, b: i32) -> i32 { a + b }\n\n";
    let mut s = String::new();
    let mut i = 0u64;
    while s.len() < 50_000 {
        s.push_str(para);
        s.push_str(&format!(
            "Item {i}: value {} ({:x})\n",
            i * 7919 % 10007,
            i * 31
        ));
        i += 1;
    }
    s
}

#[test]
fn tokenizer_encodes_50k_chars_fast() {
    let text = long_text();
    for id in ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"] {
        let t = std::time::Instant::now();
        let tok = load(id);
        let loading = t.elapsed();
        let t = std::time::Instant::now();
        let ids = tok.encode(&text, false).unwrap();
        let first = t.elapsed();
        let t = std::time::Instant::now();
        let again = tok.encode(&text, false).unwrap();
        let second = t.elapsed();
        assert_eq!(ids, again);
        let t = std::time::Instant::now();
        assert_eq!(tok.decode(&ids), text);
        let dec = t.elapsed();
        eprintln!(
            "{id}: load {loading:?}; {} chars -> {} tokens: encode {first:?} (again {second:?}), decode {dec:?}",
            text.chars().count(),
            ids.len()
        );
        assert!(first.as_secs_f64() < 2.0, "{id}: encoding took {first:?}");
    }
}
