//! Any text as a chat template from a model file: compiling and rendering a short
//! conversation is an error or text, never a crash or a hang (the instruction budget).
#![no_main]
use kvmerger_engine::chat::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let src = String::from_utf8_lossy(data);
    if let Ok(t) = ChatTemplate::new(&src, "<s>", "</s>") {
        let msgs = [
            Message::system("Be brief."),
            Message::user("Hi"),
            Message::assistant("Hello"),
            Message::user("Bye"),
        ];
        let _ = t.render(&msgs, true);
    }
});
