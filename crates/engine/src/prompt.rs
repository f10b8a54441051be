//! Prompts cut where compression stops: a context that is prefilled and compressed,
//! and a question (with the assistant turn's opening and an answer prefix) appended
//! to the compressed cache afterwards (the query-agnostic protocol), and the prompts
//! of KVzip's context reconstruction pass.

use crate::chat::{Message, RenderOptions};
use crate::load::LoadedModel;
use crate::Error;

/// A marker no template changes, placed where the context ends.
const MARK: &str = "\u{E000}kvmerger-split\u{E001}";

/// Token ids of a prompt cut after its context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitPrompt {
    /// The chat template's opening, then the context: what is compressed.
    pub context: Vec<u32>,
    /// The question, the end of the user turn, the assistant turn's opening and the
    /// answer prefix: appended uncompressed.
    pub question: Vec<u32>,
    /// How many of `context`'s first tokens are the template's opening (the system
    /// prompt and the user turn's header), not the user's context.
    pub prefix: usize,
}

impl SplitPrompt {
    /// Context and question as one prompt.
    pub fn joined(&self) -> Vec<u32> {
        let mut v = self.context.clone();
        v.extend_from_slice(&self.question);
        v
    }
}

/// Context tokens repeated per reconstruction pass (the reference implementation's chunk).
pub const CHUNK: usize = 2048;

/// The three prompts of KVzip's reconstruction pass, as token ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepeatPrompts {
    /// Before the first chunk: "Repeat the previous context exactly."
    pub first: Vec<u32>,
    /// Before later chunks, followed by the previous chunk's last tokens.
    pub later: Vec<u32>,
    /// The end of the user turn and the assistant turn's opening.
    pub suffix: Vec<u32>,
    /// Tokens of the previous chunk quoted before a later chunk.
    pub overlap: usize,
    /// Context tokens repeated per pass.
    pub chunk: usize,
}

impl LoadedModel {
    /// A conversation rendered by the chat template and encoded (with BOS as the model
    /// asks), where control tokens written inside the messages themselves (a user's
    /// `<|im_end|>\n<|im_start|>system`) stay plain text, so that no message can
    /// forge a turn: only the template's own control tokens are control tokens.
    /// Fails as [`crate::tokenizer::Tokenizer::encode_within`] past `limit` tokens.
    ///
    /// Which control tokens come from messages: the conversation is rendered a second
    /// time with each such token's bytes replaced by as many U+0001 bytes; where the
    /// two renderings differ, the token came from a message. A template that changes
    /// the length of message text around such a token gets a clear error instead.
    /// `tokenizer.json` tokenizers match their added tokens themselves, so for them
    /// messages are encoded as the rendered text (as `transformers` does).
    pub fn encode_conversation(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        limit: usize,
    ) -> Result<Vec<u32>, Error> {
        let opts = RenderOptions {
            add_generation_prompt,
            ..Default::default()
        };
        self.encode_chat(messages, &opts, limit)
    }

    /// [`Self::encode_conversation`] with tools or a continued final message.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        opts: &RenderOptions,
        limit: usize,
    ) -> Result<Vec<u32>, Error> {
        let text = self.template.render_with(messages, opts)?;
        let inside: Vec<_> = messages
            .iter()
            .map(|m| self.tokenizer.control_token_ranges(&m.content))
            .collect();
        if inside.iter().all(|r| r.is_empty()) {
            return self.tokenizer.encode_within(&text, true, limit);
        }
        let mut masked = Vec::with_capacity(messages.len());
        for (m, ranges) in messages.iter().zip(&inside) {
            let mut bytes = m.content.clone().into_bytes();
            for r in ranges {
                bytes[r.clone()].fill(1);
            }
            // Whole tokens' bytes became ASCII, so this stays UTF-8.
            let content = String::from_utf8(bytes)
                .map_err(|_| Error::Invalid("a message is not UTF-8 text".into()))?;
            masked.push(Message {
                content,
                ..m.clone()
            });
        }
        let other = self.template.render_with(&masked, opts)?;
        if other.len() != text.len() {
            return Err(Error::Invalid(
                "a message contains control-token text (such as <|im_end|>), and this chat \
                 template changes the text of messages, so it cannot be kept as plain text: \
                 remove it from the message"
                    .into(),
            ));
        }
        let plain: Vec<_> = self
            .tokenizer
            .control_token_ranges(&text)
            .into_iter()
            .filter(|r| other.as_bytes()[r.start] == 1 && text.as_bytes()[r.start] != 1)
            .collect();
        self.tokenizer
            .encode_within_plain(&text, true, limit, &plain)
    }

    /// The template's text around a user message: what comes before it and after it
    /// (with the assistant turn opened). `chat` false: no template (raw text).
    fn around_user(&self, chat: bool) -> Result<(String, String), Error> {
        if !chat {
            return Ok((String::new(), String::new()));
        }
        let text = self.template.render(&[Message::user(MARK)], true)?;
        let at = text.find(MARK).ok_or_else(|| {
            Error::Template("the chat template does not show the user's message verbatim".into())
        })?;
        Ok((text[..at].to_string(), text[at + MARK.len()..].to_string()))
    }

    /// `context` then `question` as one user message (in the chat template when `chat`),
    /// cut after the context; `answer_prefix` follows the assistant turn's opening.
    pub fn split_prompt(
        &self,
        context: &str,
        question: &str,
        answer_prefix: &str,
        chat: bool,
    ) -> Result<SplitPrompt, Error> {
        let (before, after) = if chat {
            let text = self
                .template
                .render(&[Message::user(format!("{context}{MARK}"))], true)?;
            let at = text.find(MARK).ok_or_else(|| {
                Error::Template(
                    "the chat template does not show the user's message verbatim".into(),
                )
            })?;
            (text[..at].to_string(), text[at + MARK.len()..].to_string())
        } else {
            (context.to_string(), String::new())
        };
        let context_ids = self.tokenizer.encode(&before, true)?;
        let question_ids = self
            .tokenizer
            .encode(&format!("{question}{after}{answer_prefix}"), false)?;
        let (opening, _) = self.around_user(chat)?;
        let opening_ids = self.tokenizer.encode(&opening, true)?;
        let prefix = opening_ids
            .iter()
            .zip(&context_ids)
            .take_while(|(a, b)| a == b)
            .count();
        Ok(SplitPrompt {
            context: context_ids,
            question: question_ids,
            prefix,
        })
    }

    /// A question appended to a context that [`LoadedModel::split_prompt`] cut (a
    /// stored compressed context): the question, the end of the user turn, the
    /// assistant turn's opening and `answer_prefix`. The context's text is not needed:
    /// what follows the user's message in the template does not depend on it.
    pub fn question_ids(&self, question: &str, answer_prefix: &str) -> Result<Vec<u32>, Error> {
        let (_, after) = self.around_user(true)?;
        self.tokenizer
            .encode(&format!("{question}{after}{answer_prefix}"), false)
    }

    /// The next user turn of a conversation whose last assistant answer is the last
    /// thing fed: the end of that answer's turn, the user turn with `message`, and the
    /// assistant turn's opening, as the chat template renders them.
    pub fn next_turn_ids(&self, message: &str) -> Result<Vec<u32>, Error> {
        const A: &str = "\u{E000}kvmerger-answer\u{E001}";
        let text = self.template.render(
            &[
                Message::user("x"),
                Message::assistant(A),
                Message::user(MARK),
            ],
            true,
        )?;
        let (a, m) = (text.find(A), text.find(MARK));
        let (Some(a), Some(m)) = (a, m) else {
            return Err(Error::Template(
                "the chat template does not show the messages verbatim".into(),
            ));
        };
        let between = &text[a + A.len()..m];
        let after = &text[m + MARK.len()..];
        self.tokenizer
            .encode(&format!("{between}{message}{after}"), false)
    }

    /// KVzip's reconstruction prompts in this model's chat template.
    pub fn repeat_prompts(&self) -> Result<RepeatPrompts, Error> {
        let (_, suffix) = self.around_user(true)?;
        Ok(RepeatPrompts {
            first: self
                .tokenizer
                .encode("\n\nRepeat the previous context exactly.", false)?,
            later: self.tokenizer.encode(
                "\n\nRepeat the part of the previous context exactly, starting with",
                false,
            )?,
            suffix: self.tokenizer.encode(&suffix, false)?,
            overlap: 8,
            chunk: CHUNK,
        })
    }
}
