//! The frames a session reads and writes, independent of the WebSocket library, and their
//! conversion to and from axum's messages. Tests feed sessions frames through channels.

use axum::extract::ws::{CloseFrame, Message};

/// One WebSocket frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    /// Protocol-level ping or pong (the WebSocket library answers pings itself).
    Control,
    /// The peer closes, or (outbound) we close with a code and a reason.
    Close(Option<(u16, String)>),
}

impl From<Message> for Frame {
    fn from(message: Message) -> Self {
        match message {
            Message::Text(text) => Frame::Text(text.as_str().to_owned()),
            Message::Binary(bytes) => Frame::Binary(bytes.to_vec()),
            Message::Ping(_) | Message::Pong(_) => Frame::Control,
            Message::Close(close) => Frame::Close(close.map(|close| (close.code, close.reason.as_str().to_owned()))),
        }
    }
}

impl From<Frame> for Message {
    fn from(frame: Frame) -> Self {
        match frame {
            Frame::Text(text) => Message::Text(text.into()),
            Frame::Binary(bytes) => Message::Binary(bytes.into()),
            Frame::Control => Message::Ping(Vec::new().into()),
            Frame::Close(close) => {
                Message::Close(close.map(|(code, reason)| CloseFrame { code, reason: reason.into() }))
            }
        }
    }
}
