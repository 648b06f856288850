//! The TLS side of an accepted connection, on rustls' unbuffered API.
//!
//! hubgate owns the buffers here, which rustls' buffered connection (and tokio-rustls on it)
//! keeps for a connection's whole life: a parked connection gives all of them back
//! ([`TlsIo::release_buffers`]), where a buffered session holds a 4 KiB record buffer even
//! while idle. Reads take up to a whole record (or several) per system call instead of 4 KiB,
//! and writes are encrypted straight into the outgoing buffer.
//!
//! Bytes flow through three buffers:
//! - `incoming`: TLS bytes read from the socket, not yet processed (`start..filled`). rustls
//!   deframes records in place; what it has finished with is discarded from the front.
//! - `plain`: decrypted bytes the reader had no room for yet (`plain_pos..`), handed out first.
//! - `out`: TLS bytes waiting for the socket (`out_start..out_end`): handshake messages,
//!   encrypted writes, alerts, close_notify.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConfig, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Room asked of the socket per read: a whole record of 16 KiB with its header and tag.
const READ_SIZE: usize = 17 * 1024;
/// A read is worth a system call only with at least this much room left.
const READ_MIN: usize = 4 * 1024;
/// The most unprocessed TLS bytes held: a handshake message (at most 64 KiB, the client's
/// certificate chain) spread over records, and the record after it.
const INCOMING_MAX: usize = 128 * 1024;
/// Plaintext encrypted per `poll_write`.
const WRITE_CHUNK: usize = 64 * 1024;
/// Encrypted bytes a writer may leave waiting for the socket before it is told to wait.
const WRITE_AHEAD: usize = 64 * 1024;

/// A server-side TLS connection over TCP, after [`accept`].
pub(crate) struct TlsIo {
    io: TcpStream,
    conn: UnbufferedServerConnection,
    incoming: Vec<u8>,
    start: usize,
    filled: usize,
    plain: Vec<u8>,
    plain_pos: usize,
    out: Vec<u8>,
    out_start: usize,
    out_end: usize,
    /// The socket's read side ended.
    eof: bool,
    /// The peer's close_notify arrived: no more data will come.
    read_closed: bool,
    /// Our close_notify is queued.
    close_sent: bool,
    /// The last read from the socket filled all the room it had: more may be waiting.
    read_was_full: bool,
    /// A TLS error ended the connection: nothing more is read, decrypted or encrypted.
    failed: bool,
    /// That error, when it came after data the reader was given first: its next read gets it.
    deferred: Option<io::Error>,
}

/// What a caller of [`TlsIo::advance`] wants done with the state rustls reaches.
enum Want<'a, 'b> {
    /// Nothing but the handshake (and what rustls must send).
    Nothing,
    /// Decrypted data, into this buffer first.
    Read(&'a mut ReadBuf<'b>),
    /// These bytes encrypted.
    Write(&'a [u8]),
    /// A close_notify queued.
    CloseNotify,
}

/// What one [`TlsIo::advance`] did.
#[derive(Debug)]
enum Advance {
    /// Queued TLS bytes for the peer, or decrypted data: call again.
    Progress,
    /// Nothing more without bytes from the peer.
    NeedData,
    /// Encrypted this many bytes of the caller's (or queued the close_notify: 0).
    Wrote(usize),
    /// Both sides' close_notify are through: the connection is over.
    Closed,
}

/// Runs the TLS handshake on an accepted socket. The caller bounds it in time.
pub(crate) async fn accept(config: Arc<ServerConfig>, io: TcpStream) -> io::Result<TlsIo> {
    let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
    let mut tls = TlsIo {
        io,
        conn,
        incoming: Vec::new(),
        start: 0,
        filled: 0,
        plain: Vec::new(),
        plain_pos: 0,
        out: Vec::new(),
        out_start: 0,
        out_end: 0,
        eof: false,
        read_closed: false,
        close_sent: false,
        read_was_full: false,
        failed: false,
        deferred: None,
    };
    loop {
        match tls.advance(Want::Nothing) {
            Ok(Advance::Progress | Advance::Wrote(_)) => {}
            Ok(Advance::NeedData) => {
                poll_fn(|cx| tls.poll_flush_out(cx)).await?;
                if !tls.conn.is_handshaking() {
                    return Ok(tls);
                }
                if poll_fn(|cx| tls.poll_fill(cx)).await? == 0 {
                    return Err(handshake_eof());
                }
            }
            Ok(Advance::Closed) => return Err(handshake_eof()),
            Err(e) => return Err(tls.fail(e)),
        }
    }
}

impl TlsIo {
    /// The TCP socket under the session.
    pub(crate) fn tcp(&self) -> &TcpStream {
        &self.io
    }

    /// The TLS session: the peer's certificates, the protocol ALPN chose.
    pub(crate) fn session(&self) -> &UnbufferedServerConnection {
        &self.conn
    }

    /// Holds received bytes that the socket's readiness will not announce again: decrypted data
    /// not yet read, or TLS bytes not yet processed.
    pub(crate) fn has_buffered_input(&self) -> bool {
        self.plain_pos < self.plain.len() || self.start < self.filled
    }

    /// Frees every buffer that holds nothing, for a connection about to sit idle.
    pub(crate) fn release_buffers(&mut self) {
        if self.start == self.filled {
            self.incoming = Vec::new();
            self.start = 0;
            self.filled = 0;
        }
        if self.plain_pos == self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        if self.out_start == self.out_end {
            self.out = Vec::new();
            self.out_start = 0;
            self.out_end = 0;
        }
    }

    /// Takes rustls to its next state and does what that state asks, with the bytes already
    /// read: encodes handshake messages and alerts into `out`, hands decrypted data to the
    /// reader (the rest to `plain`), encrypts the writer's bytes.
    fn advance(&mut self, want: Want<'_, '_>) -> Result<Advance, rustls::Error> {
        let TlsIo {
            conn,
            incoming,
            start,
            filled,
            plain,
            plain_pos,
            out,
            out_start,
            out_end,
            read_closed,
            close_sent,
            ..
        } = self;
        let UnbufferedStatus { discard, state } =
            conn.process_tls_records(&mut incoming[*start..*filled]);
        let done = match state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                let mut direct = match want {
                    Want::Read(buf) if *plain_pos == plain.len() => Some(buf),
                    _ => None,
                };
                let mut done = Ok(Advance::Progress);
                while let Some(record) = traffic.next_record() {
                    // Not `?`: the bytes rustls is done with must be discarded on every path.
                    let record = match record {
                        Ok(record) => record,
                        Err(e) => {
                            done = Err(e);
                            break;
                        }
                    };
                    *start += record.discard;
                    let mut payload = record.payload;
                    if let Some(buf) = direct.as_mut() {
                        let n = payload.len().min(buf.remaining());
                        buf.put_slice(&payload[..n]);
                        payload = &payload[n..];
                    }
                    if !payload.is_empty() {
                        if *plain_pos == plain.len() {
                            plain.clear();
                            *plain_pos = 0;
                        }
                        plain.extend_from_slice(payload);
                    }
                }
                done
            }
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                let mut room = 4096;
                loop {
                    let space = spare(out, *out_end, room);
                    match encode.encode(space) {
                        Ok(n) => {
                            *out_end += n;
                            break Ok(Advance::Progress);
                        }
                        Err(EncodeError::InsufficientSize(InsufficientSizeError {
                            required_size,
                        })) => room = required_size,
                        Err(EncodeError::AlreadyEncoded) => break Ok(Advance::Progress),
                    }
                }
            }
            // The bytes are in `out`, in order before anything written after them: they reach
            // the socket with the next flush.
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                transmit.done();
                Ok(Advance::Progress)
            }
            Ok(ConnectionState::PeerClosed) => {
                *read_closed = true;
                Ok(Advance::Progress)
            }
            Ok(ConnectionState::Closed) => {
                *read_closed = true;
                Ok(Advance::Closed)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Advance::NeedData),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match want {
                Want::Write(data) => {
                    let mut room = data.len() + (data.len() / (16 * 1024) + 1) * 64;
                    loop {
                        let space = spare(out, *out_end, room);
                        match traffic.encrypt(data, space) {
                            Ok(n) => {
                                *out_end += n;
                                break Ok(Advance::Wrote(data.len()));
                            }
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => room = required_size,
                            Err(EncryptError::EncryptExhausted) => {
                                break Err(rustls::Error::EncryptError);
                            }
                        }
                    }
                }
                Want::CloseNotify => {
                    let mut room = 1024;
                    loop {
                        let space = spare(out, *out_end, room);
                        match traffic.queue_close_notify(space) {
                            Ok(n) => {
                                *out_end += n;
                                *close_sent = true;
                                break Ok(Advance::Wrote(0));
                            }
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => room = required_size,
                            Err(EncryptError::EncryptExhausted) => {
                                break Err(rustls::Error::EncryptError);
                            }
                        }
                    }
                }
                _ => Ok(Advance::NeedData),
            },
            // Early data is never accepted (max_early_data_size stays 0).
            Ok(_) => Err(rustls::Error::General("unexpected TLS state".into())),
        };
        *start += discard;
        if *start == *filled {
            *start = 0;
            *filled = 0;
            // Grown for a large handshake message (a long certificate chain): a connection
            // that never parks (HTTP/2) would keep it.
            if incoming.len() > 2 * READ_SIZE {
                *incoming = Vec::new();
            }
        }
        if *out_start == *out_end {
            drained(out, out_start, out_end);
        }
        done
    }

    /// Reads from the socket into `incoming`: `Ready(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.len() - self.filled < READ_MIN {
            if self.start > 0 {
                self.incoming.copy_within(self.start..self.filled, 0);
                self.filled -= self.start;
                self.start = 0;
            }
            if self.incoming.len() - self.filled < READ_MIN {
                if self.filled >= INCOMING_MAX {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "TLS record or handshake message too large",
                    )));
                }
                let size = (self.filled + READ_SIZE).min(INCOMING_MAX);
                self.incoming.resize(size, 0);
            }
        }
        let mut buf = ReadBuf::new(&mut self.incoming[self.filled..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.read_was_full = buf.remaining() == 0;
        self.filled += n;
        if n == 0 {
            self.eof = true;
        }
        Poll::Ready(Ok(n))
    }

    /// Writes `out` to the socket until it is empty.
    fn poll_flush_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_start < self.out_end {
            let n = ready!(
                Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_start..self.out_end])
            )?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_start += n;
        }
        drained(&mut self.out, &mut self.out_start, &mut self.out_end);
        Poll::Ready(Ok(()))
    }

    /// After a TLS error: encodes what rustls queued for the peer (its alert last), tries once,
    /// without waiting, to send it, and marks the connection failed for good; gives the error
    /// as an `io::Error` carrying the rustls error.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        // Only while rustls has messages queued (each step then hands one out before looking
        // at the records): it must not look at them again, since a bad record does not poison
        // an unbuffered connection — it would decrypt it anew, and raise a second alert.
        while self.conn.wants_write() {
            if !matches!(self.advance(Want::Nothing), Ok(Advance::Progress)) {
                break;
            }
        }
        if self.out_start < self.out_end {
            if let Ok(n) = self.io.try_write(&self.out[self.out_start..self.out_end]) {
                self.out_start += n;
            }
        }
        self.failed = true;
        invalid_data(e)
    }

    /// What every call gets once the connection has failed.
    fn failed_error() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the TLS connection has failed")
    }
}

/// Resets an emptied outgoing buffer, and gives it back if a large write grew it (an HTTP/2
/// connection never parks).
fn drained(out: &mut Vec<u8>, start: &mut usize, end: &mut usize) {
    *start = 0;
    *end = 0;
    if out.len() > 2 * READ_SIZE {
        *out = Vec::new();
    }
}

/// `len` bytes of room in `out` from `end`, growing it if needed.
fn spare(out: &mut Vec<u8>, end: usize, len: usize) -> &mut [u8] {
    if out.len() < end + len {
        out.resize(end + len, 0);
    }
    &mut out[end..end + len]
}

fn handshake_eof() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "TLS handshake: the peer closed the connection",
    )
}

fn invalid_data(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.failed {
            let e = this.deferred.take().unwrap_or_else(TlsIo::failed_error);
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = (this.plain.len() - this.plain_pos).min(buf.remaining());
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
            }
            if buf.remaining() == 0 || this.read_closed {
                return Poll::Ready(Ok(()));
            }
            match this.advance(Want::Read(buf)) {
                Ok(Advance::Progress | Advance::Wrote(_)) => {}
                Ok(Advance::Closed) => return Poll::Ready(Ok(())),
                Ok(Advance::NeedData) => {
                    let got = buf.filled().len() > before;
                    // Bytes left for the socket go out now if it takes them, never a reason
                    // to wait here: a Pending after data was put in `buf` would lose it, and
                    // reading adds little to them (rustls keeps a key update's answer for the
                    // next write; at most a warning alert, such as no_renegotiation).
                    if this.out_start < this.out_end {
                        if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
                            if !got {
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
                    if this.eof {
                        if got {
                            return Poll::Ready(Ok(()));
                        }
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "peer closed connection without sending TLS close_notify",
                        )));
                    }
                    // With room left, take what else the socket has now (it may have more
                    // only if the last read filled all the room it was given): a body that
                    // arrived whole reaches hyper as one piece, which it then need not join.
                    if got && !this.read_was_full {
                        return Poll::Ready(Ok(()));
                    }
                    match this.poll_fill(cx) {
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(_)) | Poll::Pending if got => {
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Err(e) => {
                    let e = this.fail(e);
                    // What was read before the bad record is the reader's (a request, say):
                    // the error comes with the next read.
                    if buf.filled().len() > before {
                        this.deferred = Some(e);
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(e));
                }
            }
        }
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(Err(TlsIo::failed_error()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.out_end - this.out_start >= WRITE_AHEAD {
            ready!(this.poll_flush_out(cx))?;
        }
        let data = &data[..data.len().min(WRITE_CHUNK)];
        let written = loop {
            match this.advance(Want::Write(data)) {
                Ok(Advance::Wrote(n)) => break n,
                Ok(Advance::Progress) => {}
                Ok(Advance::Closed | Advance::NeedData) => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            }
        };
        // Sent now if the socket takes it; else with the next flush (or write).
        if let Poll::Ready(Err(e)) = this.poll_flush_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    // Not to be read from after this: a bad record would make rustls raise a second fatal alert
    // (its close_notify counts as one); hubgate drops a stream once it is shut down.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // After a failure the alert (if any) was the last word: no close_notify after it.
        while !this.close_sent && !this.failed {
            match this.advance(Want::CloseNotify) {
                Ok(Advance::Progress) => {}
                Ok(_) => break,
                Err(e) => return Poll::Ready(Err(this.fail(e))),
            }
        }
        this.close_sent = true;
        ready!(this.poll_flush_out(cx))?;
        match ready!(Pin::new(&mut this.io).poll_shutdown(cx)) {
            // Shutting down a socket the peer already left is not a failure.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            r => Poll::Ready(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::CertifiedKey;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::client::TlsStream;

    use super::{accept, TlsIo};

    struct Pair {
        server: TlsIo,
        client: TlsStream<TcpStream>,
    }

    /// A server on a loopback socket and a tokio-rustls client connected to it.
    async fn pair(tls12: bool) -> Pair {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let der: CertificateDer<'static> = cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(signing_key.serialize_der()));
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(der).unwrap();
        let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13]
        };
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let (server, client) = tokio::join!(
            async {
                let (socket, _) = listener.accept().await.unwrap();
                accept(Arc::new(server), socket).await.unwrap()
            },
            async {
                let socket = TcpStream::connect(addr).await.unwrap();
                let name = ServerName::try_from("localhost").unwrap();
                connector.connect(name, socket).await.unwrap()
            }
        );
        Pair { server, client }
    }

    /// An application-data record that does not decrypt, straight onto the client's socket.
    async fn send_undecryptable_record(client: &mut TlsStream<TcpStream>) {
        let mut forged = vec![23, 3, 3, 0, 40];
        forged.extend_from_slice(&[0x5a; 40]);
        client.get_mut().0.write_all(&forged).await.unwrap();
    }

    /// Distinct bytes, so that a reordered or repeated chunk shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 251) as u8)
            .collect()
    }

    async fn echo_round_trip(tls12: bool) {
        let Pair { mut server, client } = pair(tls12).await;
        // 1 MiB both ways in uneven pieces: records larger and smaller than the reads, the
        // writer far ahead of the reader (back-pressure through WRITE_AHEAD).
        let data = pattern(1 << 20);
        let sent = data.clone();
        let echo = tokio::spawn(async move {
            let mut buf = vec![0; 3000];
            let mut total = 0;
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                server.write_all(&buf[..n]).await.unwrap();
                total += n;
            }
            server.shutdown().await.unwrap();
            (total, server)
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(70_001) {
                wr.write_all(piece).await.unwrap();
            }
            wr.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        let (total, _) = echo.await.unwrap();
        assert_eq!(total, data.len());
        assert!(got == data, "the echo differs from what was sent");
    }

    #[tokio::test]
    async fn a_mebibyte_each_way_arrives_whole_and_in_order_tls13() {
        echo_round_trip(false).await;
    }

    #[tokio::test]
    async fn a_mebibyte_each_way_arrives_whole_and_in_order_tls12() {
        echo_round_trip(true).await;
    }

    #[tokio::test]
    async fn a_released_connection_holds_no_buffer_and_serves_again() {
        let Pair {
            mut server,
            mut client,
        } = pair(false).await;
        for round in 0..3u8 {
            let request = vec![round; 40_000];
            client.write_all(&request).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0; request.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, request);
            server.write_all(b"done").await.unwrap();
            server.flush().await.unwrap();
            let mut reply = [0; 4];
            client.read_exact(&mut reply).await.unwrap();
            assert_eq!(&reply, b"done");
            server.release_buffers();
            assert_eq!(
                (
                    server.incoming.capacity(),
                    server.plain.capacity(),
                    server.out.capacity()
                ),
                (0, 0, 0),
                "round {round}: a parked connection keeps a buffer"
            );
        }
    }

    #[tokio::test]
    async fn key_updates_the_client_asks_for_are_answered_and_traffic_goes_on() {
        let Pair {
            mut server,
            mut client,
        } = pair(false).await;
        for round in 0..3u8 {
            // A TLS 1.3 KeyUpdate asking for ours in return: the answer is queued while
            // reading and must precede the next reply, which is sealed with the new keys.
            client.get_mut().1.refresh_traffic_keys().unwrap();
            let request = vec![round; 20_000];
            client.write_all(&request).await.unwrap();
            client.flush().await.unwrap();
            let mut got = vec![0; request.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, request);
            server.write_all(&[round; 3]).await.unwrap();
            server.flush().await.unwrap();
            let mut reply = [0; 3];
            client.read_exact(&mut reply).await.unwrap();
            assert_eq!(reply, [round; 3]);
        }
    }

    #[tokio::test]
    async fn reading_goes_on_while_the_writer_waits_for_a_peer_that_does_not_read() {
        let Pair { server, mut client } = pair(false).await;
        let (mut rd, mut wr) = tokio::io::split(server);
        // The server answers far more than the client reads: its writer ends up waiting with
        // its outgoing buffer full, and the socket full.
        let flood = tokio::spawn(async move {
            let _ = wr.write_all(&vec![7; 8 << 20]).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let request = pattern(40_000);
        client.write_all(&request).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0; request.len()];
        tokio::time::timeout(std::time::Duration::from_secs(10), rd.read_exact(&mut got))
            .await
            .expect("the reader stalled: decrypted data was lost")
            .unwrap();
        assert!(got == request, "the reader got other bytes than were sent");
        flood.abort();
    }

    #[tokio::test]
    async fn after_a_bad_record_the_connection_stays_failed() {
        let Pair {
            mut server,
            mut client,
        } = pair(false).await;
        client.write_all(b"fine").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0; 4];
        server.read_exact(&mut got).await.unwrap();
        send_undecryptable_record(&mut client).await;
        let err = server.read(&mut [0; 16]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        // No second look at the record (rustls would raise a second alert), no data after the
        // alert, no close_notify after it either.
        assert!(server.write_all(b"answer").await.is_err());
        assert!(server.read(&mut [0; 16]).await.is_err());
        let _ = server.shutdown().await;
        let mut rest = Vec::new();
        let end = client.read_to_end(&mut rest).await;
        assert!(end.is_err(), "the client should see the alert, got {end:?}");
        assert!(rest.is_empty(), "data reached the client after the alert");
    }

    #[tokio::test]
    async fn data_before_a_bad_record_is_read_and_the_error_comes_next() {
        let Pair {
            mut server,
            mut client,
        } = pair(false).await;
        client.write_all(b"a request").await.unwrap();
        client.flush().await.unwrap();
        send_undecryptable_record(&mut client).await;
        // Both on the server's socket before it reads: one read takes the two records.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut buf = vec![0; 64];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"a request");
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    }

    #[tokio::test]
    async fn a_body_that_has_arrived_is_read_in_one_call() {
        let Pair {
            mut server,
            mut client,
        } = pair(false).await;
        let body = pattern(64 * 1024);
        client.write_all(&body).await.unwrap();
        client.flush().await.unwrap();
        // Four records on a loopback socket: all there long before this.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let mut buf = vec![0; 128 * 1024];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(
            n,
            body.len(),
            "one read should take every record that arrived"
        );
        assert!(buf[..n] == body[..]);
    }

    #[tokio::test]
    async fn input_received_but_not_read_is_reported_so_the_connection_does_not_park_on_it() {
        let Pair {
            mut server,
            mut client,
        } = pair(false).await;
        client.write_all(&pattern(30_000)).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0; 1000];
        server.read_exact(&mut got).await.unwrap();
        assert!(server.has_buffered_input(), "29,000 bytes are held");
        server.release_buffers();
        assert!(
            server.has_buffered_input(),
            "releasing must keep what is held"
        );
        let mut rest = vec![0; 29_000];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!([got, rest].concat(), pattern(30_000));
        assert!(!server.has_buffered_input());
    }

    #[tokio::test]
    async fn close_notify_is_a_clean_end_and_a_bare_fin_is_not() {
        let Pair {
            mut server,
            mut client,
        } = pair(false).await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");

        let Pair { mut server, client } = pair(false).await;
        let (mut socket, _) = client.into_inner();
        socket.shutdown().await.unwrap();
        let err = server.read(&mut [0; 16]).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        drop(socket);
    }

    #[tokio::test]
    async fn a_client_that_is_not_tls_fails_the_handshake_with_an_alert() {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut socket = TcpStream::connect(addr).await.unwrap();
            socket
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut answer = Vec::new();
            let _ = socket.read_to_end(&mut answer).await;
            answer
        });
        let (socket, _) = listener.accept().await.unwrap();
        let err = accept(Arc::new(config), socket).await.err().unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
        assert!(err.get_ref().unwrap().is::<rustls::Error>(), "{err}");
        let answer = client.await.unwrap();
        // A TLS alert record: content type 21.
        assert_eq!(
            answer.first(),
            Some(&21),
            "no alert reached the client: {answer:?}"
        );
    }
}
