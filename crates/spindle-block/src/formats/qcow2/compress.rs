//! Compressed clusters: raw deflate (QEMU's "zlib") and zstd.

use super::header::Compression;
use std::io::Read;

/// Inflates one cluster of `cluster_size` bytes from `input`, which may carry
/// trailing bytes from sector padding.
pub fn decompress(kind: Compression, input: &[u8], cluster_size: usize) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; cluster_size];
    match kind {
        Compression::Zlib => {
            let mut d = flate2::Decompress::new(false);
            match d.decompress(input, &mut out, flate2::FlushDecompress::Finish) {
                Ok(_) if d.total_out() as usize == cluster_size => Ok(out),
                Ok(_) => Err(format!("inflated to {} bytes, expected {cluster_size}", d.total_out())),
                Err(e) => Err(format!("corrupt deflate data: {e}")),
            }
        }
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("zstd: {e}"))?
                .single_frame();
            dec.read_exact(&mut out)
                .map_err(|e| format!("corrupt zstd data: {e}"))?;
            Ok(out)
        }
    }
}

/// Compresses one cluster.
pub fn compress(kind: Compression, input: &[u8]) -> Result<Vec<u8>, String> {
    match kind {
        Compression::Zlib => {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = Vec::with_capacity(input.len() + input.len() / 64 + 1024);
            match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => Ok(out),
                Ok(_) => Ok(input.to_vec()), // did not fit: callers store it uncompressed
                Err(e) => Err(format!("deflate: {e}")),
            }
        }
        Compression::Zstd => zstd::bulk::compress(input, 0).map_err(|e| format!("zstd: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_padding_and_reject_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i / 100) as u8).collect();
        for kind in [Compression::Zlib, Compression::Zstd] {
            let mut c = compress(kind, &data).unwrap();
            c.extend_from_slice(&[0xAB; 300]); // sector padding
            assert_eq!(decompress(kind, &c, 65536).unwrap(), data);
            assert!(decompress(kind, &[1, 2, 3, 4], 65536).is_err());
        }
    }
}
