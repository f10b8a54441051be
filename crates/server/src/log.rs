//! The server's log on stderr: one line per event (a finished request, a warning), as
//! `key=value` text or as one JSON object a line (`serve --log-format json`).

use serde_json::{json, Map, Value};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `kvmerger: request id=cmpl-1 status=200 ...`
    #[default]
    Text,
    /// `{"ts": 1765000000.123, "level": "info", "event": "request", "id": ...}`
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format '{other}' (expected text or json)"
            )),
        }
    }
}

/// Where log lines go: stderr, and for tests also a buffer.
#[derive(Clone, Default)]
pub struct Logger {
    pub format: LogFormat,
    capture: Option<Arc<Mutex<Vec<String>>>>,
}

impl std::fmt::Debug for Logger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logger")
            .field("format", &self.format)
            .field("captured", &self.capture.is_some())
            .finish()
    }
}

impl Logger {
    pub fn new(format: LogFormat) -> Logger {
        Logger {
            format,
            capture: None,
        }
    }

    /// A logger that also keeps every line it writes in the returned buffer.
    pub fn capturing(format: LogFormat) -> (Logger, Arc<Mutex<Vec<String>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let l = Logger {
            format,
            capture: Some(buf.clone()),
        };
        (l, buf)
    }

    /// One line: `event` at `level` (`info`, `warn`, `error`) with its fields, in order;
    /// null fields are left out.
    pub fn line(&self, level: &str, event: &str, fields: &[(&str, Value)]) {
        let text = self.render(level, event, fields);
        eprintln!("{text}");
        if let Some(c) = &self.capture {
            c.lock().unwrap_or_else(|e| e.into_inner()).push(text);
        }
    }

    /// A free-form message (start, stop): as written in text, `{"message": ...}` in JSON.
    pub fn message(&self, level: &str, text: &str) {
        let line = match self.format {
            LogFormat::Text => text.to_string(),
            LogFormat::Json => self.render(level, "message", &[("message", json!(text))]),
        };
        eprintln!("{line}");
        if let Some(c) = &self.capture {
            c.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    }

    fn render(&self, level: &str, event: &str, fields: &[(&str, Value)]) -> String {
        match self.format {
            LogFormat::Json => {
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| (d.as_millis() as f64) / 1e3)
                    .unwrap_or(0.0);
                let mut m = Map::new();
                m.insert("ts".into(), json!(ts));
                m.insert("level".into(), json!(level));
                m.insert("event".into(), json!(event));
                for (k, v) in fields {
                    if !v.is_null() {
                        m.insert((*k).to_string(), v.clone());
                    }
                }
                Value::Object(m).to_string()
            }
            LogFormat::Text => {
                let mut out = format!("kvmerger: {event}");
                if level != "info" {
                    out = format!("kvmerger: {level}: {event}");
                }
                for (k, v) in fields {
                    let shown = match v {
                        Value::Null => continue,
                        Value::String(s) if plain(s) => s.clone(),
                        Value::Number(n) => match n.as_f64() {
                            Some(x) if !n.is_i64() && !n.is_u64() => format!("{x:.3}")
                                .trim_end_matches('0')
                                .trim_end_matches('.')
                                .to_string(),
                            _ => n.to_string(),
                        },
                        other => other.to_string(),
                    };
                    out.push_str(&format!(" {k}={shown}"));
                }
                out
            }
        }
    }
}

/// A string that reads unquoted in `key=value` text.
fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_lines() {
        let fields = [
            ("id", json!("cmpl-1")),
            ("kept", json!(0.51349)),
            ("prompt_tokens", json!(37)),
            ("skipped", Value::Null),
            ("error", json!("two words")),
        ];
        let (t, buf) = Logger::capturing(LogFormat::Text);
        t.line("info", "request", &fields);
        let (j, jbuf) = Logger::capturing(LogFormat::Json);
        j.line("warn", "request", &fields);
        let text = buf.lock().unwrap()[0].clone();
        assert_eq!(
            text,
            "kvmerger: request id=cmpl-1 kept=0.513 prompt_tokens=37 error=\"two words\""
        );
        let v: Value = serde_json::from_str(&jbuf.lock().unwrap()[0]).unwrap();
        assert_eq!(v["level"], "warn");
        assert_eq!(v["prompt_tokens"], 37);
        assert!(v.get("skipped").is_none());
        assert!("yaml".parse::<LogFormat>().is_err());
    }
}
