//! Model tokens read from a brokered API's answers as they stream through the broker, so
//! a task's token budget is counted on the host, from what the API itself reported.
//!
//! `ResponseMeter` takes the answer's bytes in any pieces: the head (status line and
//! headers), then the body by `Content-Length`, chunks or the connection's end. A body of
//! server-sent events (`text/event-stream`) is read event by event; any other body is read
//! whole as JSON (up to `MAX_JSON_BODY`). Usage is taken from the `usage` objects the known
//! APIs send: Anthropic Messages (`input_tokens`, `output_tokens`, cache reads and writes
//! counted as input; in a stream, `message_start` and `message_delta`), OpenAI chat
//! completions (`prompt_tokens`, `completion_tokens`; in a stream, the last chunk) and
//! responses (`response.usage`, in `response.completed`). Streams report running totals,
//! so each figure is the largest seen.
//!
//! Pure: bytes in, counts out; nothing here trusts the guest (the bytes are the API's).

use serde_json::Value;

/// The largest JSON body kept whole; of a larger one only its last `TAIL` bytes are kept,
/// and the last `"usage"` object in them is read (the APIs put it at the end).
pub const MAX_JSON_BODY: usize = 256 * 1024;
/// The longest event line kept whole; of a longer one (an event carrying a whole answer),
/// its last `TAIL` bytes are kept and read the same way.
const MAX_LINE: usize = 256 * 1024;
const TAIL: usize = 64 * 1024;
/// The longest head read.
const MAX_HEAD: usize = 64 * 1024;

/// Tokens one answer used, as the API reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
}

/// What an answer used, as far as it could be read, and why not all of it could be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metered {
    pub tokens: Tokens,
    /// Why the usage could not be read (compressed, malformed, ...), if it could not.
    pub unreadable: Option<&'static str>,
}

impl Tokens {
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }
}

/// Reads an HTTP answer's usage as its bytes pass.
#[derive(Debug, Default)]
pub struct ResponseMeter {
    head: Vec<u8>,
    body: Option<Body>,
    tokens: Tokens,
    /// Why the usage could not be read, if it could not (compressed, too large, ...).
    unreadable: Option<&'static str>,
}

#[derive(Debug)]
struct Body {
    framing: Framing,
    kind: Kind,
}

#[derive(Debug)]
enum Framing {
    /// Bytes left by `Content-Length`.
    Length(u64),
    /// Until the connection ends.
    Close,
    Chunked(Chunk),
}

#[derive(Debug)]
enum Chunk {
    /// Reading a size line.
    Size(Vec<u8>),
    /// Payload bytes left in this chunk.
    Data(u64),
    /// The CR LF after a chunk's payload, bytes left.
    End(u8),
    /// The last chunk was read.
    Done,
    /// A size line that is not one.
    Broken,
}

#[derive(Debug)]
enum Kind {
    /// Server-sent events: the current line.
    Events(Tail),
    Json(Tail),
    /// A body with no usage to read (an error page, a compressed body).
    Skip,
}

/// Bytes kept whole up to a cap, then only their last `TAIL` bytes.
#[derive(Debug, Default)]
struct Tail {
    bytes: Vec<u8>,
    /// Bytes were dropped from the front.
    cut: bool,
}

impl Tail {
    fn push(&mut self, more: &[u8], cap: usize) {
        self.bytes.extend_from_slice(more);
        if self.bytes.len() > cap {
            let drop = self.bytes.len() - TAIL;
            self.bytes.drain(..drop);
            self.cut = true;
        }
    }

    /// The usage objects in what was kept: the whole JSON value, or (after a cut) the last
    /// `"usage"` object found in the tail.
    fn values(&self) -> Vec<Value> {
        if !self.cut {
            return serde_json::from_slice::<Value>(self.bytes.trim_ascii())
                .into_iter()
                .collect();
        }
        let Some(at) = self.bytes.windows(7).rposition(|w| w == b"\"usage\"") else {
            return Vec::new();
        };
        let after = &self.bytes[at + 7..];
        let Some(colon) = after.iter().position(|&b| b == b':') else {
            return Vec::new();
        };
        serde_json::Deserializer::from_slice(&after[colon + 1..])
            .into_iter::<Value>()
            .next()
            .and_then(Result::ok)
            .map(|usage| serde_json::json!({ "usage": usage }))
            .into_iter()
            .collect()
    }
}

impl ResponseMeter {
    pub fn new() -> ResponseMeter {
        ResponseMeter::default()
    }

    /// The next bytes of the answer.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while self.body.is_none() {
            let before = self.head.len();
            self.head.extend_from_slice(bytes);
            let from = before.saturating_sub(3);
            let Some(end) = find(&self.head[from..], b"\r\n\r\n").map(|at| from + at) else {
                if self.head.len() > MAX_HEAD {
                    self.give_up("a head longer than 64 KiB");
                    self.body = Some(Body {
                        framing: Framing::Close,
                        kind: Kind::Skip,
                    });
                }
                return;
            };
            let body_starts = end + 4;
            bytes = &bytes[(body_starts - before).min(bytes.len())..];
            // An interim answer (100 Continue, 103 Early Hints) comes before the real one.
            if interim(&self.head[..body_starts]) {
                self.head.clear();
                continue;
            }
            self.body = Some(self.read_head(body_starts));
        }
        let Some(mut body) = self.body.take() else {
            return;
        };
        while !bytes.is_empty() {
            let (payload, rest) = body.framing.take(bytes);
            self.payload(&mut body.kind, payload);
            bytes = rest;
            if body.framing.done() {
                break;
            }
        }
        if matches!(body.framing, Framing::Chunked(Chunk::Broken)) {
            self.give_up("a chunk size that is not one");
        }
        self.body = Some(body);
    }

    /// What the answer used, as far as it was read; call once it has ended.
    pub fn finish(mut self) -> Metered {
        if let Some(Body {
            kind: Kind::Json(body),
            ..
        }) = self.body.take()
            && !body.bytes.trim_ascii().is_empty()
        {
            let values = body.values();
            if values.is_empty() && !body.cut {
                self.give_up("a JSON body that does not parse");
            }
            for value in values {
                self.usage(&value);
            }
        }
        Metered {
            tokens: self.tokens,
            unreadable: self.unreadable,
        }
    }

    fn give_up(&mut self, why: &'static str) {
        self.unreadable.get_or_insert(why);
    }

    /// How the body comes, and what it is, from the head ending before `body_starts`.
    fn read_head(&mut self, body_starts: usize) -> Body {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut response = httparse::Response::new(&mut headers);
        if !matches!(
            response.parse(&self.head[..body_starts]),
            Ok(httparse::Status::Complete(_))
        ) {
            self.give_up("not an HTTP answer");
            return Body {
                framing: Framing::Close,
                kind: Kind::Skip,
            };
        }
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        let framing = if header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
            Framing::Chunked(Chunk::Size(Vec::new()))
        } else if let Some(len) = header("content-length").and_then(|l| l.trim().parse().ok()) {
            Framing::Length(len)
        } else {
            Framing::Close
        };
        let encoded = header("content-encoding").is_some_and(|e| e.trim() != "identity");
        let kind = if encoded {
            self.give_up("a compressed body");
            Kind::Skip
        } else if header("content-type").is_some_and(|t| t.starts_with("text/event-stream")) {
            Kind::Events(Tail::default())
        } else {
            Kind::Json(Tail::default())
        };
        self.head = Vec::new();
        Body { framing, kind }
    }

    fn payload(&mut self, kind: &mut Kind, bytes: &[u8]) {
        match kind {
            Kind::Skip => {}
            Kind::Json(body) => body.push(bytes, MAX_JSON_BODY),
            Kind::Events(line) => {
                for piece in bytes.split_inclusive(|&b| b == b'\n') {
                    line.push(piece, MAX_LINE);
                    if piece.ends_with(b"\n") {
                        let text = std::mem::take(line);
                        self.event_line(&text);
                    }
                }
            }
        }
    }

    fn event_line(&mut self, line: &Tail) {
        if line.cut {
            // Too long to keep: its start (`data:`) is gone, its usage is near its end.
            for value in line.values() {
                self.usage(&value);
            }
            return;
        }
        let Some(data) = line.bytes.strip_prefix(b"data:") else {
            return;
        };
        if let Ok(value) = serde_json::from_slice::<Value>(data.trim_ascii()) {
            self.usage(&value);
        }
    }

    /// Takes the usage objects of one JSON answer or event.
    fn usage(&mut self, value: &Value) {
        for usage in [
            &value["usage"],
            &value["message"]["usage"],
            &value["response"]["usage"],
        ] {
            let count = |names: &[&str]| -> Option<u64> {
                let found: Vec<u64> = names.iter().filter_map(|n| usage[*n].as_u64()).collect();
                (!found.is_empty()).then(|| found.iter().fold(0u64, |a, b| a.saturating_add(*b)))
            };
            if let Some(input) = count(&[
                "input_tokens",
                "prompt_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
            ]) {
                self.tokens.input = self.tokens.input.max(input);
            }
            if let Some(output) = count(&["output_tokens", "completion_tokens"]) {
                self.tokens.output = self.tokens.output.max(output);
            }
        }
    }
}

impl Framing {
    /// Splits `bytes` into body payload and what follows (framing bytes are consumed).
    fn take<'a>(&mut self, bytes: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        match self {
            Framing::Close => (bytes, &[]),
            Framing::Length(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                *left -= n as u64;
                (&bytes[..n], &bytes[n..])
            }
            Framing::Chunked(chunk) => chunk.take(bytes),
        }
    }

    fn done(&self) -> bool {
        matches!(
            self,
            Framing::Length(0) | Framing::Chunked(Chunk::Done | Chunk::Broken)
        )
    }
}

impl Chunk {
    /// One step of the chunked decoding: payload bytes (maybe none) and the rest.
    fn take<'a>(&mut self, bytes: &'a [u8]) -> (&'a [u8], &'a [u8]) {
        match self {
            Chunk::Size(line) => {
                let Some(at) = bytes.iter().position(|&b| b == b'\n') else {
                    if line.len() < 1024 {
                        line.extend_from_slice(bytes);
                    }
                    return (&[], &[]);
                };
                line.extend_from_slice(&bytes[..at]);
                let text = String::from_utf8_lossy(line);
                let size = text.split(';').next().unwrap_or_default().trim();
                *self = match u64::from_str_radix(size, 16) {
                    Ok(0) => Chunk::Done,
                    Ok(n) => Chunk::Data(n),
                    // Not a size: what follows cannot be read as chunks.
                    Err(_) => Chunk::Broken,
                };
                (&[], &bytes[at + 1..])
            }
            Chunk::Data(left) => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                *left -= n as u64;
                if *left == 0 {
                    *self = Chunk::End(2);
                }
                (&bytes[..n], &bytes[n..])
            }
            Chunk::End(left) => {
                let n = usize::from(*left).min(bytes.len());
                *left -= n as u8;
                if *left == 0 {
                    *self = Chunk::Size(Vec::new());
                }
                (&[], &bytes[n..])
            }
            Chunk::Done | Chunk::Broken => (&[], &[]),
        }
    }
}

/// Whether `head` is an interim answer (1xx but 101, which switches protocols).
fn interim(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    matches!(response.parse(head), Ok(httparse::Status::Complete(_)))
        && response
            .code
            .is_some_and(|c| (100..200).contains(&c) && c != 101)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the meter reads of `answer` fed in pieces of `piece` bytes.
    fn meter_in(answer: &str, piece: usize) -> (Tokens, Option<&'static str>) {
        let mut meter = ResponseMeter::new();
        for part in answer.as_bytes().chunks(piece) {
            meter.feed(part);
        }
        let m = meter.finish();
        (m.tokens, m.unreadable)
    }

    /// Feeds `answer` in pieces of every size from 1 to 7 bytes: the result may not
    /// depend on where the pieces break.
    fn meter(answer: &str) -> (Tokens, Option<&'static str>) {
        let results: Vec<_> = (1..=7).map(|piece| meter_in(answer, piece)).collect();
        let expected = meter_in(answer, answer.len().max(1));
        assert!(results.iter().all(|r| *r == expected), "{results:?}");
        expected
    }

    #[test]
    fn an_anthropic_message_counts_input_with_cache_and_output() {
        let body = r#"{"id":"msg_1","type":"message","usage":{"input_tokens":12,"cache_read_input_tokens":100,"output_tokens":34}}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(
            meter(&answer),
            (
                Tokens {
                    input: 112,
                    output: 34
                },
                None
            )
        );
    }

    #[test]
    fn a_streamed_anthropic_message_in_chunks_counts_its_running_totals_once() {
        let events = [
            r#"event: message_start"#,
            r#"data: {"type":"message_start","message":{"usage":{"input_tokens":25,"output_tokens":1}}}"#,
            "",
            r#"event: content_block_delta"#,
            r#"data: {"type":"content_block_delta","delta":{"text":"usage: 99"}}"#,
            "",
            r#"event: message_delta"#,
            r#"data: {"type":"message_delta","usage":{"output_tokens":15}}"#,
            "",
            r#"event: message_delta"#,
            r#"data: {"type":"message_delta","usage":{"output_tokens":42}}"#,
            "",
        ]
        .join("\n")
            + "\n";
        let chunked: String = events
            .as_bytes()
            .chunks(50)
            .map(|c| format!("{:x};ext=1\r\n{}\r\n", c.len(), String::from_utf8_lossy(c)))
            .collect::<String>()
            + "0\r\n\r\n";
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"
        );
        assert_eq!(
            meter(&answer).0,
            Tokens {
                input: 25,
                output: 42
            }
        );
    }

    #[test]
    fn openai_chat_and_responses_count_their_own_names() {
        let chat = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\ndata: [DONE]\n\n";
        assert_eq!(
            meter(chat).0,
            Tokens {
                input: 7,
                output: 3
            }
        );
        let responses = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\nevent: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":80,\"output_tokens\":20}}}\n\n";
        assert_eq!(meter(responses).0.total(), 100);
    }

    #[test]
    fn what_cannot_be_read_says_why_and_counts_nothing() {
        let gzip = "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\n\x1f\u{8b}\x08\x00";
        assert_eq!(meter(gzip), (Tokens::default(), Some("a compressed body")));
        let garbage = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n{nope";
        assert_eq!(meter(garbage).1, Some("a JSON body that does not parse"));
        let error = "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(meter(error), (Tokens::default(), None));
        // Bytes past the body (a second answer, trailing garbage) are not read.
        let past = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}{\"usage\":{\"input_tokens\":5}}";
        assert_eq!(meter(past), (Tokens::default(), None));
    }

    #[test]
    fn an_interim_answer_is_skipped_and_a_large_answer_read_at_its_end() {
        let body = r#"{"usage":{"input_tokens":9,"output_tokens":1}}"#;
        let answer = format!(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(
            meter(&answer),
            (
                Tokens {
                    input: 9,
                    output: 1
                },
                None
            )
        );

        // A body far past what is kept whole: its usage, at the end, is still read.
        let text = "x".repeat(MAX_JSON_BODY * 3);
        let big = format!(
            r#"{{"content":[{{"text":"{text}"}}],"usage":{{"input_tokens":1000,"output_tokens":64000}}}}"#
        );
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{big}",
            big.len()
        );
        assert_eq!(
            meter_in(&answer, 16 * 1024),
            (
                Tokens {
                    input: 1000,
                    output: 64000
                },
                None
            )
        );

        // The same for one event carrying a whole answer (OpenAI's response.completed).
        let event = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: {{\"response\":{{\"instructions\":\"{text}\",\"usage\":{{\"input_tokens\":70000,\"output_tokens\":5}}}}}}\n\n"
        );
        assert_eq!(
            meter_in(&event, 16 * 1024),
            (
                Tokens {
                    input: 70000,
                    output: 5
                },
                None
            )
        );
    }

    #[test]
    fn a_chunk_size_that_is_not_one_says_so() {
        let answer = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
        assert_eq!(meter(answer).1, Some("a chunk size that is not one"));
    }
}
