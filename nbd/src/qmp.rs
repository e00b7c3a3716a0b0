//! A small async QMP client: the JSON protocol qemu and
//! qemu-storage-daemon speak on their monitor socket. One JSON object per
//! line; the server greets, the client enables commands with
//! `qmp_capabilities`, then each command carries an id and gets exactly
//! one `return` or `error` with that id. Events (`{"event": ...}`) may
//! arrive between them at any time and are skipped. A reply line is
//! bounded, so a confused peer cannot make the client buffer without end.

use std::path::Path;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest line accepted from the server. `query-named-block-nodes` with
/// sixteen bitmaps is a few KiB; this leaves room for far more.
pub const MAX_LINE: usize = 4 << 20;

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed or closed.
    #[error("QMP connection: {0}")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// The command failed; QMP's error class and description.
    #[error("QMP {class}: {desc}")]
    Command {
        /// Error class, such as `GenericError`.
        class: String,
        /// What went wrong, in qemu's words.
        desc: String,
    },
}

/// One message from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The greeting that opens a connection.
    Greeting,
    /// A command succeeded.
    Return {
        /// The id the command carried.
        id: Option<Value>,
        /// Its result.
        value: Value,
    },
    /// A command failed.
    Error {
        /// The id the command carried.
        id: Option<Value>,
        /// Error class.
        class: String,
        /// Description.
        desc: String,
    },
    /// An asynchronous event, by name.
    Event(String),
}

/// Parses one line of QMP.
pub fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let not_qmp = |why: &str| QmpError::Protocol(format!("{why}: {:?}", String::from_utf8_lossy(&line[..line.len().min(200)])));
    let value: Value = serde_json::from_slice(line).map_err(|_| not_qmp("not JSON"))?;
    let Value::Object(mut object) = value else { return Err(not_qmp("not a JSON object")) };
    let id = object.remove("id");
    if let Some(value) = object.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(error) = object.remove("error") {
        let text = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_string);
        return match (text("class"), text("desc")) {
            (Some(class), Some(desc)) => Ok(Message::Error { id, class, desc }),
            _ => Err(not_qmp("an error without class and desc")),
        };
    }
    if let Some(Value::String(name)) = object.remove("event") {
        return Ok(Message::Event(name));
    }
    if object.contains_key("QMP") {
        return Ok(Message::Greeting);
    }
    Err(not_qmp("neither return, error, event nor greeting"))
}

/// A command line as sent: `{"execute": ..., "arguments": ..., "id": N}`
/// (no `arguments` when they are `null`).
pub fn command_line(command: &str, arguments: &Value, id: u64) -> Vec<u8> {
    let mut message = json!({ "execute": command, "id": id });
    if !arguments.is_null() {
        message["arguments"] = arguments.clone();
    }
    let mut line = serde_json::to_vec(&message).expect("a JSON value serializes");
    line.push(b'\n');
    line
}

/// A connection to a QMP monitor, ready for commands.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and enables commands.
    pub async fn connect(socket: &Path) -> Result<Qmp, QmpError> {
        let (read, write) = UnixStream::connect(socket).await?.into_split();
        let mut qmp = Qmp { reader: BufReader::new(read), writer: write, next_id: 1 };
        match qmp.next_message().await? {
            Message::Greeting => {}
            other => return Err(QmpError::Protocol(format!("expected the QMP greeting, got {other:?}"))),
        }
        qmp.execute("qmp_capabilities", Value::Null).await?;
        Ok(qmp)
    }

    /// Connects once the monitor accepts a client, trying again for up to
    /// `within` while the socket is missing, refuses, or hangs up (a
    /// daemon that is starting, or still busy with another client).
    pub async fn connect_when_ready(socket: &Path, within: std::time::Duration) -> Result<Qmp, QmpError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match Qmp::connect(socket).await {
                Err(QmpError::Io(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                result => return result,
            }
        }
    }

    /// Runs a command with its arguments (an object, or `null` for none);
    /// its `return` value, or its error.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut id = self.send(command, &arguments).await?;
        loop {
            match self.next_message().await? {
                Message::Return { id: Some(got), value } if got == id => return Ok(value),
                Message::Error { id: Some(got), class, desc } if got == id => return Err(QmpError::Command { class, desc }),
                Message::Event(_) => {}
                // A monitor that was still being set up when we connected
                // can greet twice (seen with qemu-storage-daemon 10.0): the
                // second greeting starts the session over, so negotiate
                // again.
                Message::Greeting if command == "qmp_capabilities" => id = self.send(command, &arguments).await?,
                other => return Err(QmpError::Protocol(format!("expected the reply to command {id} ({command}), got {other:?}"))),
            }
        }
    }

    /// Sends a command; its id.
    async fn send(&mut self, command: &str, arguments: &Value) -> Result<u64, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer.write_all(&command_line(command, arguments, id)).await?;
        Ok(id)
    }

    /// Reads one line (at most [`MAX_LINE`]) and parses it.
    async fn next_message(&mut self) -> Result<Message, QmpError> {
        let mut line = Vec::new();
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                return Err(QmpError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            let (taken, complete) = match available.iter().position(|&byte| byte == b'\n') {
                Some(end) => (end + 1, true),
                None => (available.len(), false),
            };
            line.extend_from_slice(&available[..taken]);
            self.reader.consume(taken);
            if line.len() > MAX_LINE {
                return Err(QmpError::Protocol(format!("a QMP line longer than {MAX_LINE} bytes")));
            }
            if complete {
                return parse_message(&line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z-]{1,8}", inner, 0..4).prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn replies_parse_back(value in json_value(), id in any::<u64>(), class in "[A-Za-z]{1,20}", desc in ".{0,80}") {
            let line = serde_json::to_vec(&json!({"return": value, "id": id})).unwrap();
            prop_assert_eq!(parse_message(&line).unwrap(), Message::Return { id: Some(Value::from(id)), value });
            let line = serde_json::to_vec(&json!({"error": {"class": class, "desc": desc}, "id": id})).unwrap();
            prop_assert_eq!(parse_message(&line).unwrap(), Message::Error { id: Some(Value::from(id)), class, desc });
        }

        #[test]
        fn commands_are_one_line_of_json(command in "[a-z-]{1,30}", value in json_value(), id in any::<u64>()) {
            let arguments = json!({ "x": value });
            let line = command_line(&command, &arguments, id);
            prop_assert_eq!(line.iter().filter(|&&byte| byte == b'\n').count(), 1);
            prop_assert_eq!(line.last(), Some(&b'\n'));
            let parsed: Value = serde_json::from_slice(&line).unwrap();
            prop_assert_eq!(&parsed["execute"], &Value::from(command));
            prop_assert_eq!(&parsed["id"], &Value::from(id));
            prop_assert_eq!(&parsed["arguments"], &arguments);
        }

        #[test]
        fn any_bytes_parse_or_fail_cleanly(line in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_message(&line);
        }
    }

    #[test]
    fn events_and_greetings_are_told_apart() {
        let greeting = br#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#;
        assert_eq!(parse_message(greeting).unwrap(), Message::Greeting);
        let event = br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BLOCK_EXPORT_DELETED", "data": {"id": "e"}}"#;
        assert_eq!(parse_message(event).unwrap(), Message::Event("BLOCK_EXPORT_DELETED".into()));
        assert!(parse_message(br#"{"error": {"class": "GenericError"}}"#).is_err());
        assert!(parse_message(b"[1]").is_err());
        assert!(parse_message(br#"{"hello": 1}"#).is_err());
    }

    #[tokio::test]
    async fn a_conversation_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n").await.unwrap();
            let mut seen = Vec::new();
            while let Some(line) = lines.next_line().await.unwrap() {
                let request: Value = serde_json::from_str(&line).unwrap();
                let id = request["id"].clone();
                seen.push(request["execute"].as_str().unwrap().to_string());
                if seen.len() == 1 {
                    // A monitor still being set up greets a second time.
                    write.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n").await.unwrap();
                    continue;
                }
                // An event before every reply, and the reply in two writes.
                write.write_all(b"{\"event\": \"JOB_STATUS_CHANGE\", \"data\": {}}\r\n").await.unwrap();
                let reply = if request["execute"] == "fail" {
                    json!({"error": {"class": "GenericError", "desc": "Bitmap already exists: cp1"}, "id": id})
                } else {
                    json!({"return": {"echo": request["arguments"]}, "id": id})
                };
                let text = format!("{reply}\r\n");
                let (first, second) = text.split_at(text.len() / 2);
                write.write_all(first.as_bytes()).await.unwrap();
                write.flush().await.unwrap();
                write.write_all(second.as_bytes()).await.unwrap();
            }
            seen
        });
        let mut qmp = Qmp::connect(&path).await.unwrap();
        let value = qmp.execute("query", json!({"flat": true})).await.unwrap();
        assert_eq!(value, json!({"echo": {"flat": true}}));
        match qmp.execute("fail", Value::Null).await {
            Err(QmpError::Command { class, desc }) => {
                assert_eq!((class.as_str(), desc.as_str()), ("GenericError", "Bitmap already exists: cp1"))
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        drop(qmp);
        assert_eq!(server.await.unwrap(), ["qmp_capabilities", "qmp_capabilities", "query", "fail"]);
    }
}
