use super::*;

fn framer(f: Framing, max: usize) -> Framer {
    f.validate(max).unwrap();
    Framer::new(&f, max)
}

/// Feeds `input` one byte at a time and all at once; both must give `want`.
fn frames_both_ways(f: Framing, max: usize, input: &[u8]) -> (Vec<Vec<u8>>, u64) {
    let mut whole = framer(f.clone(), max);
    let all = whole.push(input);
    let mut bytewise = framer(f, max);
    let mut frames = Vec::new();
    let mut oversize = 0;
    for b in input {
        let out = bytewise.push(std::slice::from_ref(b));
        frames.extend(out.frames);
        oversize += out.oversize;
    }
    assert_eq!((all.frames.clone(), all.oversize), (frames, oversize));
    (all.frames, all.oversize)
}

fn v(items: &[&[u8]]) -> Vec<Vec<u8>> {
    items.iter().map(|i| i.to_vec()).collect()
}

#[test]
fn line_strips_cr_skips_empty_lines_and_keeps_the_partial_line() {
    let (frames, oversize) = frames_both_ways(
        Framing::Line,
        64,
        b"t=21.5\r\n\r\n\nh=40\nrest-with\rcr\npartial",
    );
    assert_eq!(frames, v(&[b"t=21.5", b"h=40", b"rest-with\rcr"]));
    assert_eq!(oversize, 0);
}

#[test]
fn line_discards_an_oversize_line_and_resyncs_at_the_next_lf() {
    let mut input = b"ok1\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 100));
    input.extend(b"\nok2\n");
    let (frames, oversize) = frames_both_ways(Framing::Line, 16, &input);
    assert_eq!(frames, v(&[b"ok1", b"ok2"]));
    assert_eq!(oversize, 1);
}

#[test]
fn delimiter_as_text_or_hex_including_a_partial_match_inside_a_frame() {
    let text = Framing::Delimiter {
        delimiter: Some("##".into()),
        delimiter_hex: None,
    };
    let (frames, _) = frames_both_ways(text, 64, b"a#b##c###d##");
    assert_eq!(frames, v(&[b"a#b", b"c", b"#d"]));
    let hex = Framing::Delimiter {
        delimiter: None,
        delimiter_hex: Some("0x7E 7F".into()),
    };
    let (frames, _) = frames_both_ways(hex, 64, &[1, 0x7e, 2, 0x7e, 0x7f, 3, 0x7e, 0x7f]);
    assert_eq!(frames, v(&[&[1, 0x7e, 2], &[3]]));
}

#[test]
fn delimiter_oversize_frame_is_dropped_up_to_its_delimiter() {
    let f = Framing::Delimiter {
        delimiter: None,
        delimiter_hex: Some("0d0a".into()),
    };
    let mut input = vec![b'n'; 50];
    input.extend(b"\r\nfine\r\n");
    let (frames, oversize) = frames_both_ways(f, 8, &input);
    assert_eq!(frames, v(&[b"fine"]));
    assert_eq!(oversize, 1);
}

#[test]
fn fixed_frames_from_pieces_and_from_one_read() {
    let input: Vec<u8> = (0u8..30).collect();
    let (frames, _) = frames_both_ways(Framing::Fixed { size: 12 }, 64, &input);
    assert_eq!(frames, vec![input[..12].to_vec(), input[12..24].to_vec()]);
}

#[test]
fn length_prefixed_big_and_little_endian_with_offset_and_adjust() {
    // Start byte, 2-byte BE length, body: the frame keeps its header.
    let f = Framing::LengthPrefixed {
        length_bytes: 2,
        endian: Endian::Big,
        offset: 1,
        length_adjust: 0,
        resync_gap: None,
    };
    let input = [0xAA, 0, 3, 1, 2, 3, 0xAA, 0, 1, 9, 0xAA, 0];
    let (frames, _) = frames_both_ways(f, 64, &input);
    assert_eq!(frames, v(&[&[0xAA, 0, 3, 1, 2, 3], &[0xAA, 0, 1, 9]]));
    // 4-byte LE length that also counts a 2-byte CRC trailer.
    let f = Framing::LengthPrefixed {
        length_bytes: 4,
        endian: Endian::Little,
        offset: 0,
        length_adjust: 2,
        resync_gap: None,
    };
    let input = [1, 0, 0, 0, 7, 0xC1, 0xC2];
    let (frames, _) = frames_both_ways(f, 64, &input);
    assert_eq!(frames, v(&[&input]));
}

fn one_byte_length() -> Framing {
    Framing::LengthPrefixed {
        length_bytes: 1,
        endian: Endian::Big,
        offset: 0,
        length_adjust: 0,
        resync_gap: None,
    }
}

#[test]
fn length_prefixed_oversize_frame_is_skipped_exactly_when_its_body_fits_the_bound() {
    // 17 bytes with the header against a limit of 16: the 16-byte body is skipped, no more.
    let mut input = vec![16];
    input.extend(vec![0x55; 16]);
    input.extend([2, 7, 8]);
    let (frames, oversize) = frames_both_ways(one_byte_length(), 16, &input);
    assert_eq!(frames, v(&[&[2, 7, 8]]));
    assert_eq!(oversize, 1);
}

#[test]
fn a_corrupt_length_field_costs_at_most_max_frame_bytes() {
    let f = Framing::LengthPrefixed {
        length_bytes: 4,
        endian: Endian::Big,
        offset: 0,
        length_adjust: 0,
        resync_gap: None,
    };
    let frame = [0, 0, 0, 2, 0xA1, 0xA2];
    // A length field of 4 GiB, then a stream that never pauses: good frames resume after the
    // skipped `max` bytes (here two good frames' worth).
    let mut input = vec![0xFF, 0xFF, 0xFF, 0xFF];
    input.extend(frame.repeat(5));
    let (frames, oversize) = frames_both_ways(f, 12, &input);
    assert_eq!(frames, vec![frame.to_vec(); 3]);
    assert_eq!(oversize, 1);
}

#[test]
fn a_quiet_line_resynchronises_a_length_prefixed_stream() {
    let mut fr = framer(one_byte_length(), 64);
    // A corrupt length (200 > 64) and a partial frame: each ends at the next quiet gap.
    assert_eq!(fr.push(&[200, 1, 2, 3]).frames.len(), 0);
    assert_eq!(fr.idle().oversize, 1);
    assert_eq!(fr.push(&[5, 1, 2]).frames.len(), 0);
    assert_eq!(fr.idle().incomplete, 1);
    assert_eq!(fr.push(&[2, 7, 8]).frames, v(&[&[2, 7, 8]]));
    assert!(!fr.has_partial());
}

#[test]
fn idle_frames_end_at_silence_and_a_split_frame_becomes_two() {
    let mut f = framer(Framing::Idle { gap: None }, 16);
    assert!(f.push(&[1, 2]).frames.is_empty());
    assert!(f.push(&[3]).frames.is_empty());
    assert!(f.has_partial());
    assert_eq!(f.idle().frames, v(&[&[1, 2, 3]]));
    assert!(!f.has_partial());
    assert!(f.idle().frames.is_empty(), "silence alone is no frame");
    // Oversize: dropped at the next silence, then framing resumes.
    f.push(&[9; 10]);
    f.push(&[9; 10]);
    let out = f.idle();
    assert_eq!((out.frames.len(), out.oversize), (0, 1));
    f.push(&[4]);
    assert_eq!(f.idle().frames, v(&[&[4]]));
}

#[test]
fn bad_settings_are_refused() {
    assert!(Framing::Fixed { size: 0 }.validate(64).is_err());
    assert!(Framing::Fixed { size: 65 }.validate(64).is_err());
    let both = Framing::Delimiter {
        delimiter: Some("a".into()),
        delimiter_hex: Some("61".into()),
    };
    assert!(both.validate(64).is_err());
    let odd = Framing::Delimiter {
        delimiter: None,
        delimiter_hex: Some("7".into()),
    };
    assert!(odd.validate(64).is_err());
    let width = Framing::LengthPrefixed {
        length_bytes: 3,
        endian: Endian::Big,
        offset: 0,
        length_adjust: 0,
        resync_gap: None,
    };
    assert!(width.validate(64).is_err());
}

#[test]
fn modbus_gap_is_three_and_a_half_characters() {
    // 9600 baud, 11 bits per character: 4.01 ms.
    assert_eq!(default_idle_gap(9600, 11).as_micros(), 4010);
    assert_eq!(default_idle_gap(115_200, 10), Duration::from_micros(1750));
}

/// Found by fuzzing (framing_delimiter): the slicing into pairs of digits cut a two-byte character
/// in half, and `edgegate check` panicked instead of naming the key.
#[test]
fn hex_delimiter_with_a_multibyte_character_is_refused_not_a_panic() {
    let f = Framing::Delimiter {
        delimiter: None,
        delimiter_hex: Some("?\u{677}l".into()),
    };
    assert!(f.validate(64).unwrap_err().contains("not hex"));
}

/// Found by fuzzing (framing_length_prefixed): a frame complete with its header (a length field
/// of 0 after `length_adjust`, say an acknowledgement without payload) waited for the next byte
/// before it was cut, and a quiet line after it dropped it as incomplete.
#[test]
fn a_frame_without_a_body_is_complete_with_its_header() {
    let f = Framing::LengthPrefixed {
        length_bytes: 1,
        endian: Endian::Big,
        offset: 3,
        length_adjust: -8,
        resync_gap: None,
    };
    let mut fr = framer(f, 9);
    assert_eq!(fr.push(&[13, 13, 13, 0]).frames, v(&[&[13, 13, 13, 0]]));
    assert!(!fr.has_partial());
    assert_eq!(fr.idle(), Output::default());
}

/// Found by fuzzing (framing_length_prefixed): a header (offset and length field) longer than
/// max_frame_bytes was accepted. No frame could fit, and the framer held the whole header before
/// reading the length, past the bound: an offset of a billion would have buffered a gigabyte.
#[test]
fn a_header_longer_than_max_frame_bytes_is_refused() {
    let header_of = |length_bytes, offset| Framing::LengthPrefixed {
        length_bytes,
        endian: Endian::Big,
        offset,
        length_adjust: -2,
        resync_gap: None,
    };
    assert!(header_of(1, 3)
        .validate(1)
        .unwrap_err()
        .contains("max_frame_bytes"));
    assert!(header_of(1, 3).validate(4).is_ok());
    assert!(header_of(4, usize::MAX).validate(usize::MAX).is_err());
}

/// A length field near its maximum plus an extreme `length_adjust` overflowed (a panic in a debug
/// build; in a release build on 32-bit ARM a wrap into a small frame size that then took every
/// byte). It is an oversize frame, skipped within max_frame_bytes.
#[test]
fn an_extreme_length_and_adjust_are_an_oversize_frame_not_an_overflow() {
    let f = Framing::LengthPrefixed {
        length_bytes: 4,
        endian: Endian::Big,
        offset: 0,
        length_adjust: i64::MAX,
        resync_gap: None,
    };
    let mut fr = framer(f, 16);
    let out = fr.push(&[0xff, 0xff, 0xff, 0xff]);
    assert!(out.frames.is_empty());
    // The declared body is skipped no further than max_frame_bytes, then framing goes on.
    fr.push(&[0u8; 16]);
    assert_eq!(fr.push(&[0, 0, 0, 0]).frames.len(), 0);
}
