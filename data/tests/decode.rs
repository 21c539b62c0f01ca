//! The decoder against the `ffmpeg` CLI on real H.264 + AAC files: same frame count (with
//! `-fps_mode passthrough`), byte-identical RGB frames (bilinear scaling), the same 16 kHz mono audio; and
//! broken files give errors naming the file.

use std::path::Path;
use std::process::Command;

use avexpr_data::decode::{audio_samples, decode_audio, decode_video};

fn ffmpeg(args: &[&str]) -> Vec<u8> {
    let out =
        Command::new("ffmpeg").args(["-hide_banner", "-loglevel", "error", "-nostdin"]).args(args).output().unwrap();
    assert!(out.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// `seconds` of testsrc2 at `fps` with a stereo 44.1 kHz sine, H.264 + AAC in mp4.
fn make_video(path: &Path, fps: u32, seconds: f64, audio: bool) {
    let video = format!("testsrc2=size=320x240:rate={fps}:duration={seconds}");
    let tone = format!("sine=frequency=330:sample_rate=44100:duration={seconds}");
    let p = path.to_str().unwrap();
    if audio {
        ffmpeg(&[
            "-f",
            "lavfi",
            "-i",
            &video,
            "-f",
            "lavfi",
            "-i",
            &tone,
            "-ac",
            "2",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            "-shortest",
            "-y",
            p,
        ]);
    } else {
        ffmpeg(&["-f", "lavfi", "-i", &video, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-y", p]);
    }
}

#[test]
fn frames_and_audio_equal_the_ffmpeg_cli() {
    let tmp = tempfile::tempdir().unwrap();
    for fps in [25, 30] {
        let path = tmp.path().join(format!("clip{fps}.mp4"));
        make_video(&path, fps, 2.0, true);
        let p = path.to_str().unwrap();
        let cli = ffmpeg(&[
            "-i",
            p,
            "-fps_mode",
            "passthrough",
            "-sws_flags",
            "bilinear",
            "-s",
            "112x80",
            "-pix_fmt",
            "rgb24",
            "-f",
            "rawvideo",
            "-",
        ]);
        let frame_bytes = 112 * 80 * 3;
        let mut ours = Vec::new();
        let info = decode_video(&path, Some((112, 80)), |f| {
            assert_eq!(f.index, ours.len() / frame_bytes);
            ours.extend_from_slice(&f.data);
            Ok(())
        })
        .unwrap();
        assert_eq!(info.frames, cli.len() / frame_bytes, "frame count at {fps} fps");
        assert_eq!(info.frames, 2 * fps as usize);
        assert_eq!((info.fps, info.width, info.height, info.has_audio), (fps as f64, 320, 240, true));
        assert!(ours == cli, "RGB frames differ from the CLI's at {fps} fps");

        let samples = audio_samples(info.frames, info.fps);
        assert_eq!(samples, 32_000);
        let audio = decode_audio(&path, samples).unwrap();
        assert_eq!(audio.len(), samples, "trimmed to frames / fps");
        let cli: Vec<f32> = ffmpeg(&["-i", p, "-vn", "-ac", "1", "-ar", "16000", "-f", "f32le", "-"])
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let n = cli.len().min(samples);
        assert!(n > 31_000, "the CLI decoded {} samples", cli.len());
        let diff = audio[..n].iter().zip(&cli[..n]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-4, "audio differs from the CLI's by {diff}");
        assert!(audio.iter().map(|x| x.abs()).fold(0.0, f32::max) > 0.1, "the tone is there");
    }
}

#[test]
fn counting_without_conversion_gives_the_same_count() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("v.mp4");
    make_video(&path, 30, 1.0, true);
    let info = decode_video(&path, None, |_| panic!("no frames are converted without a size")).unwrap();
    assert_eq!(info.frames, 30);
}

#[test]
fn a_video_without_audio_decodes_to_silence() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("mute.mp4");
    make_video(&path, 25, 1.0, false);
    let info = decode_video(&path, None, |_| Ok(())).unwrap();
    assert!(!info.has_audio);
    assert_eq!(decode_audio(&path, 16_000).unwrap(), vec![0.0; 16_000]);
}

#[test]
fn corrupt_and_truncated_files_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let garbage = tmp.path().join("garbage.mp4");
    std::fs::write(&garbage, b"definitely not a video").unwrap();
    let e = decode_video(&garbage, None, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("garbage.mp4"), "{e}");

    // An mp4 cut in half loses its index (moov is written last by default).
    let whole = tmp.path().join("whole.mp4");
    make_video(&whole, 25, 2.0, true);
    let bytes = std::fs::read(&whole).unwrap();
    let cut = tmp.path().join("cut.mp4");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = decode_video(&cut, None, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("cut.mp4"), "{e}");

    let e = decode_video(&tmp.path().join("absent.mp4"), None, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("absent.mp4") && e.contains("cannot open"), "{e}");
}

/// Media that would make the decoder read other files or allocate what the file declares: a "video" that is
/// an HLS playlist naming another file (decoded through it before the format whitelist), and a frame rate of
/// 1e-5 fps (whose duration asked for ~5e11 audio samples before the frame-rate bound). Each fails its file
/// with a clear error.
#[test]
fn hostile_media_is_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let segment = tmp.path().join("segment.ts");
    let p = segment.to_str().unwrap();
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=64x48:rate=25:duration=1",
        "-c:v",
        "libx264",
        "-f",
        "mpegts",
        "-y",
        p,
    ]);
    let playlist = tmp.path().join("playlist.mp4");
    std::fs::write(&playlist, format!("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{p}\n#EXT-X-ENDLIST\n"))
        .unwrap();
    let e = decode_video(&playlist, None, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("playlist.mp4") && e.contains("cannot open") && e.contains("local files only"), "{e}");
    let e = decode_audio(&playlist, 16_000).unwrap_err().to_string();
    assert!(e.contains("playlist.mp4"), "{e}");
    // The segment itself is a readable format.
    assert_eq!(decode_video(&segment, None, |_| Ok(())).unwrap().frames, 25);

    let slow = tmp.path().join("slow.mp4");
    let s = slow.to_str().unwrap();
    ffmpeg(&["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=1/100000", "-frames:v", "2", "-c:v", "libx264", "-y", s]);
    let e = decode_video(&slow, None, |_| Ok(())).unwrap_err().to_string();
    assert!(e.contains("slow.mp4") && e.contains("implausible frame rate"), "{e}");
    // Asked directly for that much audio, the decoder refuses before allocating.
    let e = decode_audio(&slow, audio_samples(2, 1e-5)).unwrap_err().to_string();
    assert!(e.contains("slow.mp4") && e.contains("too long"), "{e}");
}
