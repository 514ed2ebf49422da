//! The NBD transmission phase on the wire, without I/O: request headers out, replies taken apart as
//! their bytes arrive (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>).
//!
//! The reply parser trusts nothing the server says: a reply to a cookie not in flight, read data outside
//! the requested range, overlapping or missing chunks, a chunk type a command cannot have — each is a
//! [`ProtocolError`], after which the connection is unusable (its framing is lost) and is closed. Memory
//! is bounded whatever the server sends: payloads stream through, only error chunks (at most
//! [`MAX_SMALL_PAYLOAD`]) and a chunk list per partly answered read (at most [`MAX_CHUNKS`]) are kept.

use std::collections::HashMap;

pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// `ESHUTDOWN` as NBD sends it: the server is going away and did not execute the command.
pub const NBD_ESHUTDOWN: u32 = 108;
/// `EIO`: what an error chunk that says "0" (a broken server) still counts as.
pub const NBD_EIO: u32 = 5;

/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Largest error chunk (errno, message, offset) a server may send.
pub const MAX_SMALL_PAYLOAD: u32 = 64 << 10;
/// Most chunks one read may be answered in.
pub const MAX_CHUNKS: usize = 4096;

/// A request header, as the server reads it.
pub fn encode_request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&command.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&length.to_be_bytes());
    h
}

/// The server broke the protocol: the connection's framing is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad reply magic {0:#x}")]
    BadMagic(u32),
    #[error("a reply to cookie {0}, which is not in flight")]
    UnknownCookie(u64),
    #[error("a simple reply with data to a read, after structured replies were agreed")]
    SimpleReadData,
    #[error("a bad {0} chunk")]
    BadChunk(&'static str),
    #[error("read data outside the requested range")]
    OutOfRange,
    #[error("overlapping read chunks")]
    Overlap,
    #[error("more than {MAX_CHUNKS} chunks for one read")]
    TooManyChunks,
    #[error("a read reply covered {covered} of {length} bytes")]
    Uncovered { covered: u32, length: u32 },
}

/// What a cookie in flight is, as far as its reply's shape goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// A READ: data comes back.
    pub read: bool,
    /// The command's offset (structured chunks say absolute offsets).
    pub offset: u64,
    /// The command's length.
    pub length: u32,
}

/// Where the parser delivers what the replies say.
pub trait Replies {
    /// What `cookie` is, if it is in flight.
    fn expect(&mut self, cookie: u64) -> Option<Expect>;
    /// Read data for `cookie`, `at` bytes into its range (a chunk may come in several pieces).
    fn data(&mut self, cookie: u64, at: u32, bytes: &[u8]);
    /// `len` bytes of zeroes for `cookie` (a hole), `at` bytes into its range.
    fn zeroes(&mut self, cookie: u64, at: u32, len: u32);
    /// The reply to `cookie` is complete: `error` 0 for success, else the server's errno. For a read that
    /// succeeded, every byte was delivered exactly once.
    fn done(&mut self, cookie: u64, error: u32);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The first four bytes of a reply: which kind it is.
    Magic,
    /// The rest of the header (16 bytes in all for a simple reply, 20 for a structured chunk).
    Header,
    /// A chunk payload kept whole (an offset, an error): `want` bytes into `small`.
    Collect,
    /// Read data streaming to the sink.
    Data,
    /// A chunk payload nobody asked for, thrown away.
    Skip,
}

/// Which parts of a read were answered so far (structured replies may answer in pieces).
#[derive(Debug, Default)]
struct Coverage {
    covered: u32,
    /// [start, end) of each chunk, kept to refuse overlaps (a gap could otherwise pass for full
    /// coverage). The first inline: most reads are answered in one chunk, with no allocation.
    first: Option<(u32, u32)>,
    more: Vec<(u32, u32)>,
    error: u32,
}

/// Takes replies apart as bytes arrive, in pieces of any size.
#[derive(Debug)]
pub struct ReplyParser {
    structured: bool,
    state: State,
    header: [u8; 20],
    have: usize,
    want: usize,
    small: Vec<u8>,
    cookie: u64,
    expect: Expect,
    chunk_flags: u16,
    chunk_type: u16,
    /// A simple reply carrying a whole read's data (no chunk bookkeeping).
    whole: bool,
    /// Data/Skip: bytes still to come; Data: where the next byte goes.
    remaining: u32,
    data_at: u32,
    /// Structured reads with chunks but no DONE yet (interleaving with other cookies is allowed).
    partial: HashMap<u64, Coverage>,
}

impl ReplyParser {
    /// `structured`: the handshake agreed on structured replies.
    pub fn new(structured: bool) -> Self {
        Self {
            structured,
            state: State::Magic,
            header: [0; 20],
            have: 0,
            want: 4,
            small: Vec::new(),
            cookie: 0,
            expect: Expect {
                read: false,
                offset: 0,
                length: 0,
            },
            chunk_flags: 0,
            chunk_type: 0,
            whole: false,
            remaining: 0,
            data_at: 0,
            partial: HashMap::new(),
        }
    }

    /// Whether the parser is between replies (nothing of a reply half-read).
    pub fn idle(&self) -> bool {
        self.state == State::Magic && self.have == 0 && self.partial.is_empty()
    }

    /// Reads of `cookie` partly answered are forgotten (the cookie is no longer in flight).
    pub fn forget(&mut self, cookie: u64) {
        self.partial.remove(&cookie);
    }

    /// Takes in `buf`, delivering to `sink` as it goes. After an error the parser is unusable.
    pub fn feed(&mut self, mut buf: &[u8], sink: &mut impl Replies) -> Result<(), ProtocolError> {
        while !buf.is_empty() {
            match self.state {
                State::Magic | State::Header => {
                    let take = (self.want - self.have).min(buf.len());
                    self.header[self.have..self.have + take].copy_from_slice(&buf[..take]);
                    self.have += take;
                    buf = &buf[take..];
                    if self.have < self.want {
                        continue;
                    }
                    if self.state == State::Magic {
                        let magic = be32(&self.header[0..4]);
                        self.want = match magic {
                            SIMPLE_REPLY_MAGIC => 16,
                            STRUCTURED_REPLY_MAGIC if self.structured => 20,
                            _ => return Err(ProtocolError::BadMagic(magic)),
                        };
                        self.state = State::Header;
                        continue;
                    }
                    self.on_header(sink)?;
                }
                State::Collect => {
                    let take = (self.want - self.small.len()).min(buf.len());
                    self.small.extend_from_slice(&buf[..take]);
                    buf = &buf[take..];
                    if self.small.len() == self.want {
                        self.on_collected(sink)?;
                    }
                }
                State::Data => {
                    let take = (self.remaining as usize).min(buf.len());
                    sink.data(self.cookie, self.data_at, &buf[..take]);
                    buf = &buf[take..];
                    self.data_at += take as u32;
                    self.remaining -= take as u32;
                    if self.remaining == 0 {
                        self.chunk_done(sink)?;
                    }
                }
                State::Skip => {
                    let take = (self.remaining as usize).min(buf.len());
                    buf = &buf[take..];
                    self.remaining -= take as u32;
                    if self.remaining == 0 {
                        self.chunk_done(sink)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn on_header(&mut self, sink: &mut impl Replies) -> Result<(), ProtocolError> {
        let simple = self.want == 16;
        // The cookie sits at the same place in both headers.
        let cookie = be64(&self.header[8..16]);
        self.cookie = cookie;
        self.expect = sink.expect(cookie).ok_or(ProtocolError::UnknownCookie(cookie))?;
        self.whole = false;
        if simple {
            self.chunk_flags = REPLY_FLAG_DONE;
            self.chunk_type = REPLY_TYPE_NONE;
            let error = be32(&self.header[4..8]);
            if error != 0 {
                self.coverage().error = error;
            } else if self.expect.read {
                if self.structured {
                    return Err(ProtocolError::SimpleReadData);
                }
                self.whole = true;
                return self.expect_data(0, self.expect.length, sink);
            }
            return self.chunk_done(sink);
        }
        self.chunk_flags = be16(&self.header[4..6]);
        self.chunk_type = be16(&self.header[6..8]);
        let length = be32(&self.header[16..20]);
        match self.chunk_type {
            REPLY_TYPE_NONE => {
                if length != 0 || self.chunk_flags & REPLY_FLAG_DONE == 0 {
                    return Err(ProtocolError::BadChunk("NONE"));
                }
                self.chunk_done(sink)
            }
            REPLY_TYPE_OFFSET_DATA => {
                if !self.expect.read || length <= 8 {
                    return Err(ProtocolError::BadChunk("OFFSET_DATA"));
                }
                self.remaining = length - 8;
                self.collect(8);
                Ok(())
            }
            REPLY_TYPE_OFFSET_HOLE => {
                if !self.expect.read || length != 12 {
                    return Err(ProtocolError::BadChunk("OFFSET_HOLE"));
                }
                self.collect(12);
                Ok(())
            }
            t if t & REPLY_TYPE_ERROR_BIT != 0 => {
                if !(6..=MAX_SMALL_PAYLOAD).contains(&length) {
                    return Err(ProtocolError::BadChunk("error"));
                }
                self.collect(length as usize);
                Ok(())
            }
            _ => {
                // A chunk type we did not ask for and do not know: skipped.
                self.remaining = length;
                if length == 0 {
                    return self.chunk_done(sink);
                }
                self.state = State::Skip;
                Ok(())
            }
        }
    }

    fn collect(&mut self, n: usize) {
        self.small.clear();
        self.want = n;
        self.state = State::Collect;
    }

    /// The offset of a chunk as a position in the command's range, if it lies inside it.
    fn within(&self, offset: u64, length: u32) -> Result<u32, ProtocolError> {
        let at = offset
            .checked_sub(self.expect.offset)
            .ok_or(ProtocolError::OutOfRange)?;
        if at + u64::from(length) > u64::from(self.expect.length) {
            return Err(ProtocolError::OutOfRange);
        }
        Ok(at as u32)
    }

    fn on_collected(&mut self, sink: &mut impl Replies) -> Result<(), ProtocolError> {
        match self.chunk_type {
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                let offset = be64(&self.small[0..8]);
                let length = if self.chunk_type == REPLY_TYPE_OFFSET_DATA {
                    self.remaining
                } else {
                    be32(&self.small[8..12])
                };
                if length == 0 {
                    return Err(ProtocolError::BadChunk("empty read"));
                }
                let at = self.within(offset, length)?;
                self.cover(at, length)?;
                if self.chunk_type == REPLY_TYPE_OFFSET_DATA {
                    return self.expect_data(at, length, sink);
                }
                sink.zeroes(self.cookie, at, length);
                self.chunk_done(sink)
            }
            _ => {
                // An error chunk: errno first (0 is not an error — a broken server; still fail the command).
                let errno = be32(&self.small[0..4]);
                let cov = self.coverage();
                if cov.error == 0 {
                    cov.error = if errno == 0 { NBD_EIO } else { errno };
                }
                self.chunk_done(sink)
            }
        }
    }

    fn coverage(&mut self) -> &mut Coverage {
        self.partial.entry(self.cookie).or_default()
    }

    fn cover(&mut self, start: u32, length: u32) -> Result<(), ProtocolError> {
        let end = start + length;
        let cov = self.coverage();
        if cov.more.len() + 1 >= MAX_CHUNKS {
            return Err(ProtocolError::TooManyChunks);
        }
        if cov
            .first
            .iter()
            .chain(&cov.more)
            .any(|&(s, e)| start < e && s < end)
        {
            return Err(ProtocolError::Overlap);
        }
        match cov.first {
            None => cov.first = Some((start, end)),
            Some(_) => cov.more.push((start, end)),
        }
        cov.covered += length;
        Ok(())
    }

    fn expect_data(&mut self, at: u32, length: u32, sink: &mut impl Replies) -> Result<(), ProtocolError> {
        self.data_at = at;
        self.remaining = length;
        self.state = State::Data;
        if length == 0 {
            return self.chunk_done(sink);
        }
        Ok(())
    }

    fn chunk_done(&mut self, sink: &mut impl Replies) -> Result<(), ProtocolError> {
        self.state = State::Magic;
        self.have = 0;
        self.want = 4;
        if self.chunk_flags & REPLY_FLAG_DONE == 0 {
            return Ok(());
        }
        let cov = self.partial.remove(&self.cookie).unwrap_or_default();
        let covered = if self.whole {
            self.expect.length
        } else {
            cov.covered
        };
        if cov.error == 0 && self.expect.read && covered != self.expect.length {
            return Err(ProtocolError::Uncovered {
                covered,
                length: self.expect.length,
            });
        }
        sink.done(self.cookie, cov.error);
        Ok(())
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the parser delivered; `cmds` says what is in flight.
    #[derive(Default)]
    struct Sink {
        cmds: HashMap<u64, Expect>,
        data: HashMap<u64, Vec<u8>>,
        done: Vec<(u64, u32)>,
    }

    impl Sink {
        fn with(cmds: &[(u64, bool, u64, u32)]) -> Self {
            let mut s = Sink::default();
            for &(cookie, read, offset, length) in cmds {
                s.cmds.insert(cookie, Expect { read, offset, length });
                s.data.insert(cookie, vec![0xee; length as usize]);
            }
            s
        }
    }

    impl Replies for Sink {
        fn expect(&mut self, cookie: u64) -> Option<Expect> {
            self.cmds.get(&cookie).copied()
        }
        fn data(&mut self, cookie: u64, at: u32, bytes: &[u8]) {
            let d = self.data.get_mut(&cookie).unwrap();
            d[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
        }
        fn zeroes(&mut self, cookie: u64, at: u32, len: u32) {
            self.data.get_mut(&cookie).unwrap()[at as usize..(at + len) as usize].fill(0);
        }
        fn done(&mut self, cookie: u64, error: u32) {
            self.cmds.remove(&cookie);
            self.done.push((cookie, error));
        }
    }

    fn simple(cookie: u64, error: u32, data: &[u8]) -> Vec<u8> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend(error.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v.extend(data);
        v
    }

    fn chunk(cookie: u64, flags: u16, kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend(flags.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend(cookie.to_be_bytes());
        v.extend((payload.len() as u32).to_be_bytes());
        v.extend(payload);
        v
    }

    fn data_chunk(cookie: u64, flags: u16, offset: u64, data: &[u8]) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend(data);
        chunk(cookie, flags, REPLY_TYPE_OFFSET_DATA, &p)
    }

    fn hole_chunk(cookie: u64, flags: u16, offset: u64, len: u32) -> Vec<u8> {
        let mut p = offset.to_be_bytes().to_vec();
        p.extend(len.to_be_bytes());
        chunk(cookie, flags, REPLY_TYPE_OFFSET_HOLE, &p)
    }

    fn error_chunk(cookie: u64, errno: u32) -> Vec<u8> {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend(3u16.to_be_bytes());
        p.extend(b"bad");
        chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT | 1, &p)
    }

    /// Feeds `stream` whole, and again one byte at a time: both must say the same.
    fn parse(structured: bool, cmds: &[(u64, bool, u64, u32)], stream: &[u8]) -> Result<Sink, ProtocolError> {
        let mut whole = Sink::with(cmds);
        ReplyParser::new(structured).feed(stream, &mut whole)?;
        let mut bytes = Sink::with(cmds);
        let mut p = ReplyParser::new(structured);
        for b in stream {
            p.feed(std::slice::from_ref(b), &mut bytes)?;
        }
        assert_eq!(whole.done, bytes.done);
        assert_eq!(whole.data, bytes.data);
        assert!(p.idle());
        Ok(whole)
    }

    #[test]
    fn request_headers_are_big_endian_with_the_magic_first() {
        let h = encode_request(CMD_FLAG_FUA, CMD_WRITE, 0x0102_0304_0506_0708, 1 << 40, 4096);
        assert_eq!(&h[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&h[4..8], &[0, 1, 0, 1]);
        assert_eq!(&h[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&h[16..24], &[0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(&h[24..28], &[0, 0, 0x10, 0]);
    }

    #[test]
    fn simple_replies_deliver_read_data_and_errors_in_any_pieces() {
        let data: Vec<u8> = (0..=255).collect();
        let mut stream = simple(7, 0, &data);
        stream.extend(simple(8, 0, &[]));
        stream.extend(simple(9, 28, &[]));
        let s = parse(
            false,
            &[(7, true, 4096, 256), (8, false, 0, 512), (9, true, 0, 512)],
            &stream,
        )
        .unwrap();
        assert_eq!(s.done, vec![(7, 0), (8, 0), (9, 28)]);
        assert_eq!(s.data[&7], data);
        // The failed read's buffer was not touched.
        assert!(s.data[&9].iter().all(|&b| b == 0xee));
    }

    #[test]
    fn structured_reads_are_assembled_from_interleaved_data_and_hole_chunks() {
        let mut stream = data_chunk(1, 0, 1024 + 512, &[2; 512]);
        stream.extend(data_chunk(2, REPLY_FLAG_DONE, 0, &[9; 100]));
        stream.extend(hole_chunk(1, 0, 1024 + 256, 256));
        stream.extend(data_chunk(1, 0, 1024, &[1; 256]));
        stream.extend(chunk(1, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]));
        stream.extend(chunk(3, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]));
        // A chunk type nobody asked for is skipped.
        stream.extend(chunk(4, 0, 5, &[0; 12]));
        stream.extend(error_chunk(4, 28));
        let cmds = [
            (1, true, 1024, 1024),
            (2, true, 0, 100),
            (3, false, 0, 4096),
            (4, true, 0, 512),
        ];
        let s = parse(true, &cmds, &stream).unwrap();
        assert_eq!(s.done, vec![(2, 0), (1, 0), (3, 0), (4, 28)]);
        let mut want = vec![1; 256];
        want.extend([0; 256]);
        want.extend([2; 512]);
        assert_eq!(s.data[&1], want);
        // A simple error reply is allowed with structured replies too.
        let s = parse(true, &[(5, false, 0, 1)], &simple(5, NBD_ESHUTDOWN, &[])).unwrap();
        assert_eq!(s.done, vec![(5, NBD_ESHUTDOWN)]);
        // An error chunk saying 0 still fails the command.
        let s = parse(true, &[(6, true, 0, 1)], &error_chunk(6, 0)).unwrap();
        assert_eq!(s.done, vec![(6, NBD_EIO)]);
    }

    #[test]
    fn every_broken_reply_is_a_protocol_error() {
        let read = [(1, true, 4096, 1024)];
        let cases: Vec<(bool, Vec<u8>, ProtocolError)> = vec![
            (false, simple(2, 0, &[]), ProtocolError::UnknownCookie(2)),
            (
                false,
                vec![0xde, 0xad, 0xbe, 0xef],
                ProtocolError::BadMagic(0xdead_beef),
            ),
            // Structured replies only once agreed.
            (
                false,
                chunk(1, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[]),
                ProtocolError::BadMagic(STRUCTURED_REPLY_MAGIC),
            ),
            (true, simple(1, 0, &[0; 1024]), ProtocolError::SimpleReadData),
            (true, data_chunk(1, 0, 0, &[0; 8]), ProtocolError::OutOfRange),
            (
                true,
                data_chunk(1, 0, 4096 + 1020, &[0; 8]),
                ProtocolError::OutOfRange,
            ),
            (true, hole_chunk(1, 0, 4096 + 1024, 1), ProtocolError::OutOfRange),
            (
                true,
                hole_chunk(1, 0, 4096, 0),
                ProtocolError::BadChunk("empty read"),
            ),
            (
                true,
                chunk(1, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, &[0; 8]),
                ProtocolError::BadChunk("OFFSET_DATA"),
            ),
            (
                true,
                chunk(1, 0, REPLY_TYPE_NONE, &[]),
                ProtocolError::BadChunk("NONE"),
            ),
            (
                true,
                chunk(1, REPLY_FLAG_DONE, REPLY_TYPE_ERROR_BIT | 1, &[0; 4]),
                ProtocolError::BadChunk("error"),
            ),
            (
                true,
                [
                    data_chunk(1, 0, 4096, &[0; 512]),
                    data_chunk(1, 0, 4096 + 511, &[0; 2]),
                ]
                .concat(),
                ProtocolError::Overlap,
            ),
            (
                true,
                data_chunk(1, REPLY_FLAG_DONE, 4096, &[0; 1000]),
                ProtocolError::Uncovered {
                    covered: 1000,
                    length: 1024,
                },
            ),
        ];
        for (structured, stream, want) in cases {
            let mut sink = Sink::with(&read);
            let got = ReplyParser::new(structured).feed(&stream, &mut sink);
            assert_eq!(got, Err(want.clone()), "{want}");
            assert!(sink.done.is_empty(), "{want}: nothing completed");
        }
        // A write cannot be answered with data.
        let mut sink = Sink::with(&[(1, false, 0, 8)]);
        let got = ReplyParser::new(true).feed(&data_chunk(1, REPLY_FLAG_DONE, 0, &[0; 8]), &mut sink);
        assert_eq!(got, Err(ProtocolError::BadChunk("OFFSET_DATA")));
    }

    #[test]
    fn a_read_in_too_many_chunks_is_refused_without_unbounded_memory() {
        let mut p = ReplyParser::new(true);
        let mut sink = Sink::with(&[(1, true, 0, 1 << 20)]);
        let mut got = Ok(());
        for k in 0..MAX_CHUNKS as u64 + 1 {
            got = p.feed(&hole_chunk(1, 0, k * 8, 8), &mut sink);
            if got.is_err() {
                break;
            }
        }
        assert_eq!(got, Err(ProtocolError::TooManyChunks));
    }

    proptest::proptest! {
        /// However the stream is cut, the parser delivers the same thing.
        #[test]
        fn any_split_of_a_reply_stream_parses_the_same(cuts in proptest::collection::vec(0usize..2000, 0..8)) {
            let mut stream = data_chunk(1, 0, 512, &[3; 512]);
            stream.extend(simple(2, 0, &[]));
            stream.extend(hole_chunk(1, REPLY_FLAG_DONE, 0, 512));
            stream.extend(error_chunk(3, 5));
            let cmds = [(1, true, 0, 1024), (2, false, 0, 0), (3, true, 0, 4096)];
            let mut sink = Sink::with(&cmds);
            let mut p = ReplyParser::new(true);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            for w in cuts.windows(2) {
                p.feed(&stream[w[0]..w[1]], &mut sink).unwrap();
            }
            proptest::prop_assert_eq!(sink.done, vec![(2, 0), (1, 0), (3, 5)]);
            let mut want = vec![0; 512];
            want.extend([3; 512]);
            proptest::prop_assert_eq!(&sink.data[&1], &want);
        }
    }
}
