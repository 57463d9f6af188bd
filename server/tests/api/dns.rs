//! A tiny authoritative DNS server on loopback for the domain verification tests: it answers
//! TXT queries (over UDP and TCP) from records the test sets, NXDOMAIN for any other name, and
//! counts the queries it answered, so a test can prove the server really asked.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

#[derive(Default)]
struct Zone {
    /// TXT values by lowercase name without the root's dot.
    records: Mutex<HashMap<String, Vec<String>>>,
    queries: AtomicU64,
}

impl Zone {
    fn answer(&self, request: &[u8]) -> Option<Vec<u8>> {
        // A malformed packet gets no answer, like from a real server.
        let request = Message::from_vec(request).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        self.queries.fetch_add(1, Ordering::SeqCst);
        let mut response = Message::response(request.metadata.id, request.metadata.op_code);
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        let mut found = false;
        for query in &request.queries {
            response.add_query(query.clone());
            let key = query.name().to_lowercase().to_ascii().trim_end_matches('.').to_owned();
            let records = self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(values) = records.get(&key) {
                found = true;
                if query.query_type() == RecordType::TXT {
                    for value in values {
                        let txt = RData::TXT(TXT::new(vec![value.clone()]));
                        response.add_answer(Record::from_rdata(query.name().clone(), 0, txt));
                    }
                }
            }
        }
        if !found {
            response.metadata.response_code = ResponseCode::NXDomain;
        }
        response.to_vec().ok()
    }
}

/// The server; it stops when dropped.
pub struct DnsServer {
    address: SocketAddr,
    zone: Arc<Zone>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DnsServer {
    /// Listens on 127.0.0.1, UDP and TCP on the same free port.
    pub async fn start() -> anyhow::Result<DnsServer> {
        // The kernel picks the UDP port; TCP takes the same one, retried a bounded number of
        // times in case another process holds it.
        for _ in 0..20 {
            let udp = UdpSocket::bind("127.0.0.1:0").await?;
            let address = udp.local_addr()?;
            let Ok(tcp) = TcpListener::bind(address).await else { continue };
            let zone = Arc::new(Zone::default());
            let tasks =
                vec![tokio::spawn(serve_udp(udp, Arc::clone(&zone))), tokio::spawn(serve_tcp(tcp, Arc::clone(&zone)))];
            return Ok(DnsServer { address, zone, tasks });
        }
        anyhow::bail!("no free port for both UDP and TCP on 127.0.0.1")
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Replaces the TXT values at `name`; an empty list removes the name.
    pub fn set_txt(&self, name: &str, values: &[&str]) {
        let mut records = self.zone.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if values.is_empty() {
            records.remove(name);
        } else {
            records.insert(name.to_owned(), values.iter().map(|value| (*value).to_owned()).collect());
        }
    }

    /// How many queries it answered so far.
    pub fn queries(&self) -> u64 {
        self.zone.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn serve_udp(socket: UdpSocket, zone: Arc<Zone>) {
    let mut buffer = vec![0u8; 4096];
    loop {
        let Ok((length, peer)) = socket.recv_from(&mut buffer).await else { return };
        if let Some(answer) = zone.answer(&buffer[..length]) {
            let _ = socket.send_to(&answer, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Zone>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { return };
        let zone = Arc::clone(&zone);
        tokio::spawn(async move {
            // Each message is preceded by its length (RFC 1035 section 4.2.2).
            loop {
                let Ok(length) = stream.read_u16().await else { return };
                let mut request = vec![0u8; usize::from(length)];
                if stream.read_exact(&mut request).await.is_err() {
                    return;
                }
                let Some(answer) = zone.answer(&request) else { return };
                let Ok(answer_length) = u16::try_from(answer.len()) else { return };
                if stream.write_u16(answer_length).await.is_err() || stream.write_all(&answer).await.is_err() {
                    return;
                }
            }
        });
    }
}
