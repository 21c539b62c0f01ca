//! Decoding a video file with FFmpeg's libraries (`ffmpeg-next`): every video frame at the stream's native
//! rate, in decode order of presentation, with no frame duplicated or dropped (no rate conversion, unlike the
//! `ffmpeg` CLI's default), optionally scaled to RGB; and the audio track as 16 kHz mono f32, trimmed or
//! zero-padded to exactly the video's duration (frames / fps).

use std::path::{Path, PathBuf};

use ffmpeg::format::{Pixel, Sample, sample};
use ffmpeg::media::Type;
use ffmpeg::software::{resampling, scaling};
use ffmpeg::util::channel_layout::ChannelLayout;
use ffmpeg::util::frame;
use ffmpeg_next as ffmpeg;

/// Audio sample rate of everything downstream (Wav2Vec 2.0's).
pub const AUDIO_RATE: u32 = 16_000;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{path}: {reason}")]
    Media { path: PathBuf, reason: String },
}

fn media_err(path: &Path, what: &str, e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Media { path: path.to_path_buf(), reason: format!("{what}: {e}") }
}

/// What the decoder found.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoInfo {
    pub frames: usize,
    pub fps: f64,
    pub width: u32,
    pub height: u32,
    /// False when the file has no audio stream (the audio is then silence).
    pub has_audio: bool,
}

/// One decoded frame, RGB24 rows of `width * 3` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbFrame {
    pub index: usize,
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// The demuxers a dataset's media may use (Aff-Wild2 ships MP4 and AVI; MKV, WebM, MPEG-TS and FLV are what
/// other corpora and re-encodes bring). Playlists and other formats that open further files or URLs (HLS,
/// concat, image sequences, ...) are refused, and only local files may be read (`file` protocol).
pub const FORMATS: &str = "mov,mp4,m4a,3gp,3g2,mj2,avi,matroska,webm,mpegts,flv";

/// The longest video (frames / fps) whose audio is decoded: 16 kHz f32 for 4 hours is ~0.9 GB.
pub const MAX_SECONDS: f64 = 4.0 * 3600.0;

/// Opens a media file for demuxing with the format and protocol whitelists.
fn open_input(path: &Path) -> Result<ffmpeg::format::context::Input, DecodeError> {
    let mut options = ffmpeg::Dictionary::new();
    options.set("format_whitelist", FORMATS);
    options.set("protocol_whitelist", "file");
    ffmpeg::format::input_with_dictionary(path, options)
        .map_err(|e| media_err(path, "cannot open", format!("{e} (readable formats: {FORMATS}; local files only)")))
}

fn init() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        ffmpeg::init().expect("FFmpeg initialises");
        // Failures come back as errors naming the file; libav's own lines would repeat them without it.
        ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Fatal);
    });
}

/// Decodes every video frame. With `rgb_size`, each frame is scaled (bilinear) to that size and handed to
/// `on_frame`; without it frames are only counted (cheaper: no conversion).
pub fn decode_video(
    path: &Path,
    rgb_size: Option<(u32, u32)>,
    mut on_frame: impl FnMut(RgbFrame) -> Result<(), DecodeError>,
) -> Result<VideoInfo, DecodeError> {
    init();
    let mut input = open_input(path)?;
    let stream = input.streams().best(Type::Video).ok_or_else(|| media_err(path, "no video stream", "none found"))?;
    let stream_index = stream.index();
    let rate = stream.avg_frame_rate();
    let rate = if rate.denominator() != 0 && rate.numerator() > 0 { rate } else { stream.rate() };
    if rate.denominator() == 0 || rate.numerator() <= 0 {
        return Err(media_err(path, "unknown frame rate", format!("{rate}")));
    }
    let fps = rate.numerator() as f64 / rate.denominator() as f64;
    let fps_range = crate::limits::FPS;
    if !fps_range.contains(&fps) {
        return Err(media_err(path, "implausible frame rate", format!("{fps} fps is not in {fps_range:?}")));
    }
    let context = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| media_err(path, "bad codec parameters", e))?;
    let mut decoder = context.decoder().video().map_err(|e| media_err(path, "cannot open the video decoder", e))?;
    // One decoding thread per video: ingest runs one decoder per core.
    decoder.set_threading(ffmpeg::threading::Config {
        count: 1,
        ..ffmpeg::threading::Config::kind(ffmpeg::threading::Type::Frame)
    });
    let (width, height) = (decoder.width(), decoder.height());
    let mut scaler = match rgb_size {
        Some((w, h)) => Some(
            scaling::Context::get(decoder.format(), width, height, Pixel::RGB24, w, h, scaling::Flags::BILINEAR)
                .map_err(|e| media_err(path, "cannot create the scaler", e))?,
        ),
        None => None,
    };
    let mut frames = 0usize;
    let mut decoded = frame::Video::empty();
    let mut receive = |decoder: &mut ffmpeg::decoder::Video, frames: &mut usize| -> Result<(), DecodeError> {
        while decoder.receive_frame(&mut decoded).is_ok() {
            if let (Some(scaler), Some((w, h))) = (scaler.as_mut(), rgb_size) {
                let mut rgb = frame::Video::empty();
                scaler.run(&decoded, &mut rgb).map_err(|e| media_err(path, "scaling failed", e))?;
                // Rows are padded to the line size: copy row by row.
                let stride = rgb.stride(0);
                let row = w as usize * 3;
                let mut data = Vec::with_capacity(row * h as usize);
                for y in 0..h as usize {
                    data.extend_from_slice(&rgb.data(0)[y * stride..y * stride + row]);
                }
                on_frame(RgbFrame { index: *frames, width: w, height: h, data })?;
            }
            *frames += 1;
            if *frames > crate::limits::MAX_FRAMES {
                return Err(media_err(path, "too long", format!("more than {} frames", crate::limits::MAX_FRAMES)));
            }
        }
        Ok(())
    };
    for (stream, packet) in input.packets() {
        if stream.index() == stream_index {
            decoder
                .send_packet(&packet)
                .map_err(|e| media_err(path, &format!("corrupt video at frame {frames}"), e))?;
            receive(&mut decoder, &mut frames)?;
        }
    }
    decoder.send_eof().map_err(|e| media_err(path, "cannot flush the decoder", e))?;
    receive(&mut decoder, &mut frames)?;
    if frames == 0 {
        return Err(media_err(path, "no video frame could be decoded", "empty or corrupt stream"));
    }
    if frames as f64 / fps > MAX_SECONDS {
        return Err(media_err(
            path,
            "too long",
            format!("{frames} frames at {fps} fps last more than {MAX_SECONDS} s (its audio would not fit in memory)"),
        ));
    }
    let has_audio = input.streams().best(Type::Audio).is_some();
    Ok(VideoInfo { frames, fps, width, height, has_audio })
}

/// The audio track as 16 kHz mono f32, trimmed or zero-padded to `samples` (the video's duration); silence
/// when the file has no audio stream.
pub fn decode_audio(path: &Path, samples: usize) -> Result<Vec<f32>, DecodeError> {
    init();
    let most = (MAX_SECONDS * AUDIO_RATE as f64) as usize;
    if samples > most {
        return Err(media_err(path, "too long", format!("{samples} audio samples asked for, at most {most}")));
    }
    let mut input = open_input(path)?;
    let Some(stream) = input.streams().best(Type::Audio) else {
        return Ok(vec![0.0; samples]);
    };
    let stream_index = stream.index();
    let context = ffmpeg::codec::context::Context::from_parameters(stream.parameters())
        .map_err(|e| media_err(path, "bad audio codec parameters", e))?;
    let mut decoder = context.decoder().audio().map_err(|e| media_err(path, "cannot open the audio decoder", e))?;
    let layout = if decoder.channel_layout().is_empty() {
        ChannelLayout::default(decoder.channels() as i32)
    } else {
        decoder.channel_layout()
    };
    let mut resampler = resampling::Context::get(
        decoder.format(),
        layout,
        decoder.rate(),
        Sample::F32(sample::Type::Packed),
        ChannelLayout::MONO,
        AUDIO_RATE,
    )
    .map_err(|e| media_err(path, "cannot create the resampler", e))?;
    let mut out = Vec::with_capacity(samples);
    let mut decoded = frame::Audio::empty();
    // Audio past the video's end is dropped as it comes (a track far longer than the video cannot fill memory).
    let append = |resampled: &frame::Audio, out: &mut Vec<f32>| {
        let room = samples.saturating_sub(out.len()).min(resampled.samples());
        out.extend_from_slice(&resampled.plane::<f32>(0)[..room]);
    };
    let mut receive = |decoder: &mut ffmpeg::decoder::Audio, out: &mut Vec<f32>| -> Result<(), DecodeError> {
        while decoder.receive_frame(&mut decoded).is_ok() {
            if decoded.channel_layout().is_empty() {
                decoded.set_channel_layout(layout);
            }
            let mut resampled = frame::Audio::empty();
            resampler.run(&decoded, &mut resampled).map_err(|e| media_err(path, "resampling failed", e))?;
            append(&resampled, out);
        }
        Ok(())
    };
    for (stream, packet) in input.packets() {
        if stream.index() == stream_index {
            decoder.send_packet(&packet).map_err(|e| media_err(path, "corrupt audio", e))?;
            receive(&mut decoder, &mut out)?;
        }
    }
    decoder.send_eof().map_err(|e| media_err(path, "cannot flush the audio decoder", e))?;
    receive(&mut decoder, &mut out)?;
    // Drain the resampler's delay into an allocated frame (an empty one gets nothing).
    loop {
        let mut tail = frame::Audio::new(Sample::F32(sample::Type::Packed), 4096, ChannelLayout::MONO);
        tail.set_rate(AUDIO_RATE);
        match resampler.flush(&mut tail) {
            Ok(_) if tail.samples() > 0 => append(&tail, &mut out),
            _ => break,
        }
    }
    out.resize(samples, 0.0);
    Ok(out)
}

/// Samples of 16 kHz audio covering `frames` frames at `fps`.
pub fn audio_samples(frames: usize, fps: f64) -> usize {
    (frames as f64 / fps * AUDIO_RATE as f64).round() as usize
}
