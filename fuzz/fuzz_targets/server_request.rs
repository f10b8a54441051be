//! Any bytes as a request body: parsing a completion or chat request, its prompt and
//! its `kv_compression` (and its protocol) is a request or an OpenAI error, never a
//! crash.
#![no_main]
use kvmerger_server::api::{self, ChatRequest, CompletionRequest};
use kvmerger_compression::Recipe;
use kvmerger_server::compression::{request_protocol, RequestRecipe};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = api::parse::<CompletionRequest>(data) {
        let _ = api::parse_prompt(&req.prompt);
        if let Some(kv) = &req.kv_compression {
            let _ = request_protocol(Some(kv));
            if let Ok(recipe) = Recipe::full().with_request(kv) {
                let _ = recipe.build();
            }
        }
    }
    if let Ok(req) = api::parse::<ChatRequest>(data) {
        for (i, m) in req.messages.iter().enumerate() {
            let _ = api::message_role(i, &m.role);
            let _ = api::message_text(i, &m.content);
        }
        if let Some(kv) = &req.kv_compression {
            let _ = request_protocol(Some(kv));
            if let Ok(recipe) = Recipe::full().with_request(kv) {
                let _ = recipe.build();
            }
        }
    }
});
