//! A small QMP (QEMU Machine Protocol) client.
//!
//! QMP is line-delimited JSON over a unix socket: a greeting, then `qmp_capabilities`, then
//! commands, each answered by `{"return": ...}` or `{"error": {"class", "desc"}}`, with
//! asynchronous `{"event": ...}` lines in between. [`Decoder`] is the framing, pure and bounded
//! (a line longer than [`MAX_LINE`] is an error, not a growing buffer); [`Qmp`] is the client
//! over any async stream, with a time limit on every exchange.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest QMP line accepted (QEMU's answers to the commands used here are small).
pub const MAX_LINE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: {source}")]
    Connect { path: String, source: std::io::Error },
    #[error("QMP connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QMP sent something that is not a JSON object: {0}")]
    Malformed(String),
    #[error("QMP did not answer {command} within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
}

/// One QMP message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting(Value),
    Return(Value),
    Error { class: String, desc: String },
    Event { name: String, data: Value },
}

/// Splits bytes into messages.
#[derive(Debug, Default)]
pub struct Decoder {
    buffer: Vec<u8>,
}

impl Decoder {
    /// Feeds bytes; answers the complete messages they finish, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<Message>, QmpError> {
        self.buffer.extend_from_slice(bytes);
        let mut messages = Vec::new();
        while let Some(end) = self.buffer.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim();
            if !line.is_empty() {
                messages.push(parse(line)?);
            }
        }
        if self.buffer.len() > MAX_LINE {
            return Err(QmpError::LineTooLong);
        }
        Ok(messages)
    }
}

fn parse(line: &str) -> Result<Message, QmpError> {
    let malformed = || QmpError::Malformed(line.chars().take(200).collect());
    let value: Value = serde_json::from_str(line).map_err(|_| malformed())?;
    let object = value.as_object().ok_or_else(malformed)?;
    if let Some(greeting) = object.get("QMP") {
        return Ok(Message::Greeting(greeting.clone()));
    }
    if let Some(returned) = object.get("return") {
        return Ok(Message::Return(returned.clone()));
    }
    if let Some(error) = object.get("error") {
        let field = |name: &str| error.get(name).and_then(Value::as_str).unwrap_or("").to_owned();
        return Ok(Message::Error { class: field("class"), desc: field("desc") });
    }
    if let Some(name) = object.get("event").and_then(Value::as_str) {
        return Ok(Message::Event { name: name.to_owned(), data: object.get("data").cloned().unwrap_or(Value::Null) });
    }
    Err(malformed())
}

/// A QMP session, ready for commands.
pub struct Qmp<S> {
    stream: S,
    decoder: Decoder,
    pending: std::collections::VecDeque<Message>,
    timeout: Duration,
}

impl Qmp<tokio::net::UnixStream> {
    /// Connects to QEMU's QMP socket and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout { command: "connect".into(), timeout })?
            .map_err(|source| QmpError::Connect { path: path.display().to_string(), source })?;
        Self::handshake(stream, timeout).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Qmp<S> {
    /// Reads the greeting and enables commands.
    pub async fn handshake(stream: S, timeout: Duration) -> Result<Self, QmpError> {
        let mut qmp = Self { stream, decoder: Decoder::default(), pending: Default::default(), timeout };
        let greeting = qmp.next_message("greeting").await?;
        if !matches!(greeting, Message::Greeting(_)) {
            return Err(QmpError::Malformed(format!("expected the greeting, got {greeting:?}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and answers its `return` value; events in between are skipped.
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        tokio::time::timeout(self.timeout, self.stream.write_all(line.as_bytes()))
            .await
            .map_err(|_| QmpError::Timeout { command: command.into(), timeout: self.timeout })??;
        loop {
            match self.next_message(command).await? {
                Message::Return(value) => return Ok(value),
                Message::Error { class, desc } => {
                    return Err(QmpError::Command { command: command.into(), class, desc });
                }
                Message::Event { name, .. } => tracing::debug!(event = %name, "QMP event"),
                Message::Greeting(_) => return Err(QmpError::Malformed("a second greeting".into())),
            }
        }
    }

    /// The VM's run state (`running`, `paused`, `postmigrate`, `inmigrate`, ...).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let value = self.execute("query-status", None).await?;
        value
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Malformed(format!("query-status returned {value}")))
    }

    async fn next_message(&mut self, command: &str) -> Result<Message, QmpError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut buffer = [0u8; 4096];
        loop {
            if let Some(message) = self.pending.pop_front() {
                return Ok(message);
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read(&mut buffer))
                .await
                .map_err(|_| QmpError::Timeout { command: command.into(), timeout: self.timeout })??;
            if read == 0 {
                return Err(QmpError::Closed);
            }
            self.pending.extend(self.decoder.push(&buffer[..read])?);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What QEMU 10.0 sent on its QMP socket, captured.
    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#;
    const STOP_EVENT: &str = r#"{"timestamp": {"seconds": 1764062000, "microseconds": 12345}, "event": "STOP"}"#;

    #[test]
    fn captured_lines_decode_in_every_split() {
        let text = format!(
            "{GREETING}\r\n{{\"return\": {{}}}}\r\n{STOP_EVENT}\r\n{{\"return\": {{\"status\": \"paused\", \"running\": false}}}}\r\n{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"no\"}}}}\r\n"
        );
        let bytes = text.as_bytes();
        for split in 0..bytes.len() {
            let mut decoder = Decoder::default();
            let mut messages = decoder.push(&bytes[..split]).unwrap();
            messages.extend(decoder.push(&bytes[split..]).unwrap());
            assert_eq!(messages.len(), 5, "split at {split}");
            assert!(matches!(messages[0], Message::Greeting(_)));
            assert_eq!(messages[1], Message::Return(json!({})));
            assert_eq!(messages[2], Message::Event { name: "STOP".into(), data: Value::Null });
            assert_eq!(messages[3], Message::Return(json!({"status": "paused", "running": false})));
            assert_eq!(messages[4], Message::Error { class: "GenericError".into(), desc: "no".into() });
        }
    }

    #[test]
    fn hostile_lines_are_errors() {
        assert!(matches!(Decoder::default().push(b"[1,2]\n"), Err(QmpError::Malformed(_))));
        assert!(matches!(Decoder::default().push(b"{\"x\": 1}\n"), Err(QmpError::Malformed(_))));
        assert!(matches!(Decoder::default().push(&vec![b'a'; MAX_LINE + 1]), Err(QmpError::LineTooLong)));
    }

    #[tokio::test]
    async fn the_client_negotiates_skips_events_and_types_errors() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let peer = tokio::spawn(async move {
            let mut seen = Vec::new();
            server.write_all(format!("{GREETING}\r\n").as_bytes()).await.unwrap();
            let mut reader = tokio::io::BufReader::new(&mut server);
            let mut answers = [
                "{\"return\": {}}\r\n".to_owned(),
                format!("{STOP_EVENT}\r\n{{\"return\": {{}}}}\r\n"),
                "{\"return\": {\"status\": \"paused\", \"running\": false}}\r\n".to_owned(),
                "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\r\n"
                    .to_owned(),
            ]
            .into_iter();
            loop {
                let mut line = String::new();
                if tokio::io::AsyncBufReadExt::read_line(&mut reader, &mut line).await.unwrap() == 0 {
                    return seen;
                }
                seen.push(serde_json::from_str::<Value>(&line).unwrap());
                let answer = answers.next().unwrap();
                reader.get_mut().write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let mut qmp = Qmp::handshake(client, Duration::from_secs(5)).await.unwrap();
        assert_eq!(qmp.execute("stop", None).await.unwrap(), json!({}));
        assert_eq!(qmp.status().await.unwrap(), "paused");
        let error = qmp.execute("nope", Some(json!({"a": 1}))).await.unwrap_err();
        assert!(matches!(&error, QmpError::Command { class, .. } if class == "CommandNotFound"), "{error}");
        drop(qmp);
        let seen = peer.await.unwrap();
        assert_eq!(
            seen,
            [
                json!({"execute": "qmp_capabilities"}),
                json!({"execute": "stop"}),
                json!({"execute": "query-status"}),
                json!({"execute": "nope", "arguments": {"a": 1}})
            ]
        );
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (client, _server) = tokio::io::duplex(1024);
        let error = Qmp::handshake(client, Duration::from_millis(50)).await.err().unwrap();
        assert!(matches!(error, QmpError::Timeout { .. }), "{error}");
    }
}
