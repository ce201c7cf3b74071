//! Properties of the container format over random frame sequences: round
//! trips through files and streams, truncation at any byte, and detection of
//! any single damaged byte.

use std::path::Path;

use nyx_trace::{
    Completeness, ContainerKind, Frame, FrameKind, GuestImage, StreamReader, StreamWriter, TraceHeader, TraceReader,
    TraceWriter,
};
use proptest::prelude::*;

/// One frame to write: kind, position step from the previous frame, payload.
type Spec = (FrameKind, u64, Vec<u8>);

fn header() -> TraceHeader {
    TraceHeader {
        uuid: *b"fedcba9876543210",
        nyx_version: "0.1.0-test".into(),
        kind: ContainerKind::Trace,
        machine_config: b"machine configuration".to_vec(),
        images: vec![GuestImage::embedded("kernel", b"kernel bytes".to_vec())],
    }
}

fn kind() -> impl Strategy<Value = FrameKind> {
    prop_oneof![
        Just(FrameKind::Events),
        Just(FrameKind::MachineState),
        Just(FrameKind::Memory),
    ]
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        (any::<u8>(), 0usize..2000).prop_map(|(b, n)| vec![b; n]),
    ]
}

fn specs(max: usize) -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec((kind(), 0u64..50, payload()), 0..max)
}

/// Writes `specs` with a stream writer; returns the bytes of the finished
/// container and the frames as they should read back.
fn encode(specs: &[Spec]) -> (Vec<u8>, Vec<Frame>) {
    let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
    let mut position = 0;
    let mut expected = Vec::new();
    for (kind, step, payload) in specs {
        position += step;
        let info = w.write_frame(*kind, position, payload).unwrap();
        expected.push(Frame {
            info,
            payload: payload.clone(),
        });
    }
    (w.finish().unwrap(), expected)
}

/// Bytes of the encoded header: where the first frame starts.
fn header_len() -> usize {
    let w = StreamWriter::new(Vec::new(), &header()).unwrap();
    w.bytes_written() as usize
}

/// Opens `bytes` as a file and reads every frame; the first error ends it.
fn read_file(dir: &Path, bytes: &[u8]) -> Result<(Vec<Frame>, Completeness), nyx_trace::Error> {
    let path = dir.join("t.nyx");
    std::fs::write(&path, bytes).unwrap();
    let mut r = TraceReader::open(&path)?;
    assert_eq!(r.header(), &header());
    let frames = r.frames_from(0).collect::<Result<Vec<_>, _>>()?;
    Ok((frames, r.completeness()))
}

/// Reads `bytes` as a stream: the frames it yielded, and how it ended.
fn read_stream(bytes: &[u8]) -> (Vec<Frame>, Result<Completeness, nyx_trace::Error>) {
    let mut r = match StreamReader::new(bytes) {
        Ok(r) => r,
        Err(e) => return (Vec::new(), Err(e)),
    };
    let mut frames = Vec::new();
    loop {
        match r.next_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(e) => return (frames, Err(e)),
        }
    }
    let end = r.completeness().expect("set once next_frame returned None");
    (frames, Ok(end))
}

/// What a reader must yield for `bytes[..cut]`: the frames that end at or before it.
fn complete_before(expected: &[Frame], cut: usize) -> Vec<Frame> {
    expected
        .iter()
        .filter(|f| f.info.end() <= cut as u64)
        .cloned()
        .collect()
}

fn check_truncation(dir: &Path, bytes: &[u8], expected: &[Frame], cut: usize) {
    let header_len = header_len();
    let want = complete_before(expected, cut);
    match read_file(dir, &bytes[..cut]) {
        Ok((frames, completeness)) => {
            assert!(cut >= header_len, "opened with only {cut} header bytes");
            assert_eq!(frames, want, "cut at {cut}");
            if cut == bytes.len() {
                assert_eq!(completeness, Completeness::Complete);
            } else {
                assert_eq!(
                    completeness,
                    Completeness::Incomplete {
                        valid_bytes: want.last().map_or(header_len as u64, |f| f.info.end()),
                        last_position: want.last().map(|f| f.info.first_position),
                    },
                    "cut at {cut}"
                );
            }
        }
        Err(_) => assert!(cut < header_len, "cut at {cut} after the header failed"),
    }
    let (frames, end) = read_stream(&bytes[..cut]);
    assert_eq!(frames, want, "stream cut at {cut}");
    if cut >= header_len {
        let complete = matches!(end, Ok(Completeness::Complete));
        assert_eq!(complete, cut == bytes.len(), "stream cut at {cut}: {end:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// (a) Frames written to a file read back identically, through the index.
    #[test]
    fn file_round_trip(specs in specs(12)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.nyx");
        let mut w = TraceWriter::create(&path, &header()).unwrap();
        let mut position = 0;
        for (kind, step, payload) in &specs {
            position += step;
            w.write_frame(*kind, position, payload).unwrap();
        }
        let infos = w.frames().to_vec();
        w.finish().unwrap();
        let mut r = TraceReader::open(&path).unwrap();
        prop_assert!(r.is_complete());
        prop_assert_eq!(r.header(), &header());
        prop_assert_eq!(r.frames(), infos.as_slice());
        for (i, (kind, _, payload)) in specs.iter().enumerate() {
            let f = r.read_frame(i).unwrap();
            prop_assert_eq!(f.info.kind, *kind);
            prop_assert_eq!(&f.payload, payload);
        }
        // Seeking agrees with a linear search over the frames.
        for probe in [0, position / 2, position, position + 1] {
            let linear = infos
                .iter()
                .rposition(|f| f.kind == FrameKind::MachineState && f.first_position <= probe);
            prop_assert_eq!(r.keyframe_at_or_before(probe), linear);
        }
    }

    /// (b) A finished or partial container cut at any byte yields exactly
    /// the frames completely written before the cut.
    #[test]
    fn truncation_yields_complete_frames(specs in specs(8), at in any::<prop::sample::Index>()) {
        let (bytes, expected) = encode(&specs);
        let dir = tempfile::tempdir().unwrap();
        check_truncation(dir.path(), &bytes, &expected, at.index(bytes.len() + 1));
        // A `.partial` file is a prefix that ends at a frame boundary.
        let partial_len = expected.last().map_or(0, |f| f.info.end() as usize);
        if partial_len > 0 {
            check_truncation(dir.path(), &bytes, &expected, at.index(partial_len + 1));
        }
    }

    /// (c) Any single damaged byte of a finished file is an error, never
    /// different data; a damaged stream or partial file at worst ends early.
    #[test]
    fn any_flipped_byte_is_detected(
        specs in specs(6),
        at in any::<prop::sample::Index>(),
        mask in 1u8..=255,
    ) {
        let (mut bytes, expected) = encode(&specs);
        let i = at.index(bytes.len());
        bytes[i] ^= mask;
        let dir = tempfile::tempdir().unwrap();
        let result = read_file(dir.path(), &bytes);
        prop_assert!(result.is_err(), "byte {} flipped by {:#x} went unnoticed", i, mask);

        let (frames, end) = read_stream(&bytes);
        prop_assert!(expected.starts_with(&frames), "stream yielded altered frames");
        prop_assert!(!matches!(end, Ok(Completeness::Complete)), "stream ended cleanly");

        let partial_len = expected.last().map_or(0, |f| f.info.end() as usize);
        if i < partial_len {
            // An error is fine; a success must be a shorter, unaltered prefix.
            if let Ok((frames, completeness)) = read_file(dir.path(), &bytes[..partial_len]) {
                prop_assert!(frames.len() < expected.len());
                prop_assert!(expected.starts_with(&frames));
                prop_assert!(completeness != Completeness::Complete);
            }
        }
    }

    /// (d) Typed records through a stream writer and a stream reader.
    #[test]
    fn stream_round_trip(
        batches in prop::collection::vec(
            (kind(), 0u64..1000, prop::collection::vec((any::<u64>(), ".{0,12}"), 0..20)),
            0..10,
        ),
    ) {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        let mut position = 0;
        for (kind, step, records) in &batches {
            position += step;
            w.write_records(*kind, position, records).unwrap();
        }
        let bytes = w.finish().unwrap();
        let mut r = StreamReader::new(bytes.as_slice()).unwrap();
        prop_assert_eq!(r.header(), &header());
        let mut position = 0;
        for (kind, step, records) in &batches {
            position += step;
            let (info, back) = r.next_records::<(u64, String)>().unwrap().unwrap();
            prop_assert_eq!((info.kind, info.first_position), (*kind, position));
            prop_assert_eq!(&back, records);
        }
        prop_assert!(r.next_frame().unwrap().is_none());
        prop_assert_eq!(r.completeness(), Some(Completeness::Complete));
    }
}

/// (b) exhaustively for one small container: every cut from 0 to its length.
#[test]
fn every_cut_of_a_small_trace() {
    let specs: Vec<Spec> = vec![
        (FrameKind::MachineState, 0, b"registers".to_vec()),
        (FrameKind::Memory, 0, vec![0; 300]),
        (FrameKind::Events, 3, (0..40).collect()),
        (FrameKind::Events, 9, Vec::new()),
    ];
    let (bytes, expected) = encode(&specs);
    let dir = tempfile::tempdir().unwrap();
    for cut in 0..=bytes.len() {
        check_truncation(dir.path(), &bytes, &expected, cut);
    }
}

/// (c) exhaustively for one small container: every byte, two different flips.
#[test]
fn every_flip_of_a_small_trace() {
    let specs: Vec<Spec> = vec![
        (FrameKind::MachineState, 1, b"registers".to_vec()),
        (FrameKind::Events, 2, (0..30).collect()),
    ];
    let (bytes, _) = encode(&specs);
    let dir = tempfile::tempdir().unwrap();
    for i in 0..bytes.len() {
        for mask in [0x01, 0x80] {
            let mut damaged = bytes.clone();
            damaged[i] ^= mask;
            assert!(
                read_file(dir.path(), &damaged).is_err(),
                "byte {i} flipped by {mask:#x} went unnoticed"
            );
        }
    }
}
