//! Any `:authority` on the unix socket. gRPC C-core clients (Python, Ruby, C++, PHP) and
//! grpc-java send the socket's path, %-encoded, as the HTTP/2 `:authority` of a unix-socket
//! channel; it is no valid authority, and the HTTP/2 stack under tonic refuses such a request
//! with `PROTOCOL_ERROR` before any code of ours sees it. On a unix socket the authority carries
//! no meaning (the socket names the peer), so [`AnyAuthority`] wraps each accepted connection and
//! replaces an authority that does not parse with `localhost` on the way in.
//!
//! Header blocks are HPACK-compressed with a table shared by the client's encoder and the
//! server's decoder. The first block of a connection is decoded: when its authority parses
//! (tonic, grpc-go, grpcurl: clients keep one authority per connection), the connection is
//! not looked at again and its bytes pass through as they came, at no cost. Otherwise that
//! block and every later one of the connection is decoded (following the client's table)
//! and re-encoded as literals that never touch the server's table, which therefore stays
//! consistent.

use std::{
    borrow::Cow,
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, ReadBuf};
use tonic::{codegen::http::uri::Authority, transport::server::Connected};

/// What an HTTP/2 client sends first.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// The frame size the server accepts (HTTP/2's default `SETTINGS_MAX_FRAME_SIZE`); re-encoded
/// blocks are cut to it.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The server's HPACK table size (HTTP/2's default `SETTINGS_HEADER_TABLE_SIZE`): a client
/// may not grow its table beyond it.
const MAX_TABLE_SIZE: usize = 4_096;
/// The largest compressed header block followed; a larger one closes the connection.
const MAX_BLOCK: usize = 256 * 1024;
/// The authority an unparsable one becomes.
const REPLACEMENT: &[u8] = b"localhost";

/// Reads HTTP/2 from a client and hands it on with every `:authority` parsable.
struct Rewriter {
    /// Input not yet handled (an incomplete preface, frame header or header block).
    pending: Vec<u8>,
    /// Bytes of the current non-header frame still to pass through.
    passing: usize,
    /// The preface has been seen (or the stream is no HTTP/2 and passes through untouched).
    started: bool,
    /// The client's HPACK table, followed.
    decoder: loona_hpack::Decoder<'static>,
    /// Blocks are re-encoded from now on.
    rewriting: bool,
    /// The connection is not followed any more (not HTTP/2, or its first authority parsed):
    /// everything passes.
    opaque: bool,
    /// The fields of the block being handled, as spans of `arena` (reused: no allocation
    /// per field).
    arena: Vec<u8>,
    spans: Vec<(usize, usize, usize)>,
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE_SIZE);
        Self {
            pending: Vec::new(),
            passing: 0,
            started: false,
            decoder,
            rewriting: false,
            opaque: false,
            arena: Vec::new(),
            spans: Vec::new(),
        }
    }

    /// Handles `input`, appending what the server should read to `out`.
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let mut input = input;
        // Fast path: the middle of a frame that passes through, straight from the input.
        if self.pending.is_empty() && !self.opaque && self.passing > 0 {
            let take = self.passing.min(input.len());
            out.extend_from_slice(&input[..take]);
            self.passing -= take;
            input = &input[take..];
        }
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(input);
        let mut at = 0;
        let result = self.drain(&pending, &mut at, out);
        pending.drain(..at);
        self.pending = pending;
        result
    }

    /// Handles as much of `pending` from `at` as is complete, moving `at` past it.
    fn drain(&mut self, pending: &[u8], at: &mut usize, out: &mut Vec<u8>) -> io::Result<()> {
        loop {
            let rest = &pending[*at..];
            if self.opaque {
                out.extend_from_slice(rest);
                *at += rest.len();
                return Ok(());
            }
            if !self.started {
                let seen = rest.len().min(PREFACE.len());
                if rest[..seen] != PREFACE[..seen] {
                    self.opaque = true;
                    continue;
                }
                if seen < PREFACE.len() {
                    return Ok(());
                }
                out.extend_from_slice(PREFACE);
                *at += PREFACE.len();
                self.started = true;
                continue;
            }
            if self.passing > 0 {
                let take = self.passing.min(rest.len());
                out.extend_from_slice(&rest[..take]);
                *at += take;
                self.passing -= take;
                if self.passing > 0 {
                    return Ok(());
                }
                continue;
            }
            let Some(header) = FrameHeader::parse(rest) else { return Ok(()) };
            if header.kind != HEADERS {
                out.extend_from_slice(&rest[..FRAME_HEADER_LEN]);
                *at += FRAME_HEADER_LEN;
                self.passing = header.len;
                continue;
            }
            match self.header_block(rest)? {
                Some((block_len, block)) => {
                    self.emit(&rest[..block_len], &block, out)?;
                    *at += block_len;
                }
                None => return Ok(()),
            }
        }
    }

    /// The HEADERS frame at the start of `input` and its CONTINUATIONs, once all are there:
    /// their length in bytes and the block they carry.
    fn header_block(&self, input: &[u8]) -> io::Result<Option<(usize, HeaderBlock)>> {
        let mut at = 0;
        let mut block = HeaderBlock::default();
        loop {
            let Some(header) = FrameHeader::parse(&input[at..]) else { return Ok(None) };
            let expected = if at == 0 { HEADERS } else { CONTINUATION };
            if header.kind != expected || (at > 0 && header.stream != block.stream) {
                return Err(protocol("a header block is interrupted by another frame"));
            }
            if at + FRAME_HEADER_LEN + header.len > MAX_BLOCK {
                return Err(protocol("a header block is larger than 256 KiB"));
            }
            let Some(payload) = input.get(at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + header.len) else {
                return Ok(None);
            };
            let fragment = if at == 0 {
                block.stream = header.stream;
                block.end_stream = header.flags & END_STREAM != 0;
                let mut payload = payload;
                let mut padding = 0;
                if header.flags & PADDED != 0 {
                    padding = *payload.first().ok_or_else(|| protocol("a padded frame without its padding"))?;
                    payload = &payload[1..];
                }
                if header.flags & PRIORITY != 0 {
                    let priority = payload.get(..5).ok_or_else(|| protocol("a priority frame without its priority"))?;
                    block.priority = Some(priority.try_into().unwrap_or_default());
                    payload = &payload[5..];
                }
                payload
                    .len()
                    .checked_sub(usize::from(padding))
                    .map(|end| &payload[..end])
                    .ok_or_else(|| protocol("padding longer than its frame"))?
            } else {
                payload
            };
            block.fragment.extend_from_slice(fragment);
            at += FRAME_HEADER_LEN + header.len;
            if header.flags & END_HEADERS != 0 {
                return Ok(Some((at, block)));
            }
        }
    }

    /// Follows one header block and hands it on: as it came, or re-encoded with a parsable
    /// authority.
    fn emit(&mut self, raw: &[u8], block: &HeaderBlock, out: &mut Vec<u8>) -> io::Result<()> {
        let (arena, spans) = (&mut self.arena, &mut self.spans);
        arena.clear();
        spans.clear();
        let mut replace = false;
        self.decoder
            .decode_with_cb(&block.fragment, |name: Cow<[u8]>, value: Cow<[u8]>| {
                let start = arena.len();
                arena.extend_from_slice(&name);
                let name_end = arena.len();
                if &*name == b":authority" && Authority::try_from(&*value).is_err() {
                    replace = true;
                    arena.extend_from_slice(REPLACEMENT);
                } else {
                    arena.extend_from_slice(&value);
                }
                spans.push((start, name_end, arena.len()));
            })
            .map_err(|e| protocol(&format!("a header block does not decode: {e}")))?;
        self.rewriting |= replace;
        if !self.rewriting {
            // A first authority that parses: nothing of this connection needs looking at.
            self.opaque = true;
            out.extend_from_slice(raw);
            return Ok(());
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for &(start, name_end, end) in &self.spans {
            // A literal field without indexing, with a literal name: the server's table is
            // never touched.
            encoded.push(0x00);
            encode_string(&self.arena[start..name_end], &mut encoded);
            encode_string(&self.arena[name_end..end], &mut encoded);
        }
        let mut first = Vec::with_capacity(5);
        if let Some(priority) = block.priority {
            first.extend_from_slice(&priority);
        }
        let mut chunks = encoded.chunks(MAX_FRAME_PAYLOAD - first.len()).peekable();
        let head = chunks.next().unwrap_or_default();
        let mut flags = if block.end_stream { END_STREAM } else { 0 };
        if block.priority.is_some() {
            flags |= PRIORITY;
        }
        if chunks.peek().is_none() {
            flags |= END_HEADERS;
        }
        write_frame(out, HEADERS, flags, block.stream, &[&first, head]);
        while let Some(chunk) = chunks.next() {
            let flags = if chunks.peek().is_none() { END_HEADERS } else { 0 };
            write_frame(out, CONTINUATION, flags, block.stream, &[chunk]);
        }
        Ok(())
    }
}

/// A header block gathered from its frames.
#[derive(Default)]
struct HeaderBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

struct FrameHeader {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHeader {
    fn parse(input: &[u8]) -> Option<Self> {
        let header: &[u8; FRAME_HEADER_LEN] = input.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        Some(Self {
            len: usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]),
            kind: header[3],
            flags: header[4],
            stream: u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff,
        })
    }
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    for part in parts {
        out.extend_from_slice(part);
    }
}

/// An HPACK string literal, not Huffman-coded: a 7-bit-prefix length, then the bytes.
fn encode_string(value: &[u8], out: &mut Vec<u8>) {
    let mut len = value.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len % 0x80) as u8 | 0x80);
            len /= 0x80;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(value);
}

fn protocol(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("http/2 from a unix-socket client: {what}"))
}

/// A connection whose HTTP/2 requests reach the server with a parsable `:authority`.
#[derive(Debug)]
pub struct AnyAuthority<S> {
    inner: S,
    rewriter: Box<RewriterState>,
}

/// The rewriter and what it produced that the server has not read yet.
struct RewriterState {
    rewriter: Rewriter,
    ready: Vec<u8>,
    read_at: usize,
    scratch: Box<[u8]>,
}

impl std::fmt::Debug for RewriterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewriterState").field("rewriting", &self.rewriter.rewriting).finish_non_exhaustive()
    }
}

impl<S> AnyAuthority<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> Self {
        let state =
            RewriterState { rewriter: Rewriter::new(), ready: Vec::new(), read_at: 0, scratch: vec![0; 16_384].into() };
        Self { inner, rewriter: Box::new(state) }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let state = &mut *this.rewriter;
        loop {
            if state.read_at < state.ready.len() {
                let take = (state.ready.len() - state.read_at).min(buf.remaining());
                buf.put_slice(&state.ready[state.read_at..state.read_at + take]);
                state.read_at += take;
                if state.read_at == state.ready.len() {
                    state.ready.clear();
                    state.read_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            // Nothing to look at any more: straight into the caller's buffer.
            if state.rewriter.opaque && state.rewriter.pending.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut scratch = ReadBuf::new(&mut state.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut scratch))?;
            if scratch.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            state.rewriter.feed(scratch.filled(), &mut state.ready)?;
        }
    }
}

forward_async_write!(AnyAuthority);

impl<S: Connected> Connected for AnyAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        pairs.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    fn request(authority: &str, path: &str) -> Fields {
        fields(&[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ])
    }

    /// A client connection: the preface, then HEADERS frames its encoder (with indexing,
    /// as real clients do) made, cut into CONTINUATIONs of `frame` bytes when asked.
    struct Client {
        encoder: loona_hpack::Encoder<'static>,
        bytes: Vec<u8>,
    }

    impl Client {
        fn new() -> Self {
            Self { encoder: loona_hpack::Encoder::new(), bytes: PREFACE.to_vec() }
        }

        fn headers(&mut self, stream: u32, fields: &Fields, frame: usize, flags: u8) {
            let block = self.encoder.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])));
            let mut chunks = block.chunks(frame).peekable();
            let first = chunks.next().unwrap_or_default();
            let end = if chunks.peek().is_none() { END_HEADERS } else { 0 };
            write_frame(&mut self.bytes, HEADERS, flags | end, stream, &[first]);
            while let Some(chunk) = chunks.next() {
                let end = if chunks.peek().is_none() { END_HEADERS } else { 0 };
                write_frame(&mut self.bytes, CONTINUATION, end, stream, &[chunk]);
            }
        }

        fn data(&mut self, stream: u32, payload: &[u8]) {
            write_frame(&mut self.bytes, 0x0, 0, stream, &[payload]);
        }
    }

    /// What a server reads: the header lists of every HEADERS block, decoded with one table
    /// (as the server's decoder would), and the payloads of every DATA frame.
    fn server_reads(mut bytes: &[u8]) -> (Vec<Fields>, Vec<Vec<u8>>) {
        assert!(bytes.starts_with(PREFACE));
        bytes = &bytes[PREFACE.len()..];
        let mut decoder = loona_hpack::Decoder::new();
        let (mut blocks, mut data, mut block) = (Vec::new(), Vec::new(), Vec::new());
        while let Some(header) = FrameHeader::parse(bytes) {
            let payload = &bytes[FRAME_HEADER_LEN..FRAME_HEADER_LEN + header.len];
            assert!(header.len <= MAX_FRAME_PAYLOAD);
            match header.kind {
                HEADERS | CONTINUATION => {
                    let skip = if header.flags & PRIORITY != 0 { 5 } else { 0 };
                    block.extend_from_slice(&payload[skip..]);
                    if header.flags & END_HEADERS != 0 {
                        blocks.push(decoder.decode(&std::mem::take(&mut block)).expect("the server decodes"));
                    }
                }
                _ => data.push(payload.to_vec()),
            }
            bytes = &bytes[FRAME_HEADER_LEN + header.len..];
        }
        assert!(bytes.is_empty(), "a partial frame is left");
        (blocks, data)
    }

    /// Feeds `input` in pieces of `piece` bytes, as reads from a socket would.
    fn rewrite(input: &[u8], piece: usize) -> Vec<u8> {
        let mut rewriter = Rewriter::new();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            rewriter.feed(chunk, &mut out).expect("rewrites");
        }
        out
    }

    #[test]
    fn valid_authorities_pass_byte_for_byte() {
        let mut client = Client::new();
        client.headers(1, &request("localhost", "/banger.v1.VmService/GetVm"), 16_384, 0);
        client.data(1, b"\0\0\0\0\x02hi");
        client.headers(3, &request("localhost", "/banger.v1.VmService/ListVms"), 16_384, END_STREAM);
        for piece in [1, 7, 4096] {
            assert_eq!(rewrite(&client.bytes, piece), client.bytes, "in pieces of {piece}");
        }
    }

    #[test]
    fn a_socket_path_as_authority_becomes_localhost_and_later_blocks_stay_consistent() {
        let path = "%2Frun%2Fbanger%2Fbangerd.sock";
        assert!(Authority::try_from(path).is_err(), "the case this module exists for");
        let mut client = Client::new();
        let big = "x".repeat(40_000);
        let sent = [
            request(path, "/banger.v1.VmService/GetVm"),
            // The same fields again: the client's encoder now refers to its table.
            request(path, "/banger.v1.VmService/GetVm"),
            request("localhost", "/banger.v1.VmService/ListVms"),
            // A block larger than one frame, sent in continuations and re-cut on the way.
            [request(path, "/banger.v1.VmService/WatchVms"), fields(&[("x-big", &big)])].concat(),
        ];
        for (index, fields) in sent.iter().enumerate() {
            let stream = 1 + 2 * index as u32;
            client.headers(stream, fields, 1000, 0);
            client.data(stream, format!("payload {index}").as_bytes());
        }
        for piece in [1, 13, 16_384, 1 << 20] {
            let (blocks, data) = server_reads(&rewrite(&client.bytes, piece));
            let expected: Vec<Fields> = sent
                .iter()
                .map(|fields| {
                    fields
                        .iter()
                        .map(|(n, v)| (n.clone(), if n == b":authority" { b"localhost".to_vec() } else { v.clone() }))
                        .collect()
                })
                .collect();
            assert_eq!(blocks, expected, "in pieces of {piece}");
            assert_eq!(data.len(), 4);
            assert_eq!(data[3], b"payload 3");
        }
    }

    #[test]
    fn padding_and_priority_are_understood() {
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode([(&b":authority"[..], &b"/tmp/x.sock"[..]), (&b":path"[..], &b"/a"[..])]);
        let mut bytes = PREFACE.to_vec();
        let priority = [0, 0, 0, 0, 16];
        write_frame(&mut bytes, HEADERS, END_HEADERS | PADDED | PRIORITY, 1, &[&[3], &priority, &block, &[0, 0, 0]]);
        let (blocks, _) = server_reads(&rewrite(&bytes, 5));
        assert_eq!(blocks, vec![fields(&[(":authority", "localhost"), (":path", "/a")])]);
    }

    #[test]
    fn what_is_not_http2_passes_untouched_and_broken_blocks_are_refused() {
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(rewrite(http1, 3), http1);
        let mut bytes = PREFACE.to_vec();
        write_frame(&mut bytes, HEADERS, END_HEADERS, 1, &[&[0xff, 0xff, 0xff, 0xff, 0x0f]]);
        assert!(Rewriter::new().feed(&bytes, &mut Vec::new()).is_err(), "an index beyond every table");
        let mut bytes = PREFACE.to_vec();
        write_frame(&mut bytes, HEADERS, 0, 1, &[&[0x82]]);
        write_frame(&mut bytes, 0x0, 0, 1, &[b"x"]);
        assert!(Rewriter::new().feed(&bytes, &mut Vec::new()).is_err(), "a block interrupted by data");
    }

    #[test]
    fn long_strings_use_the_integer_continuation() {
        let mut out = Vec::new();
        encode_string(&[b'a'; 300], &mut out);
        assert_eq!(&out[..3], &[0x7f, 0xad, 0x01]);
        assert_eq!(out.len(), 303);
    }
}
