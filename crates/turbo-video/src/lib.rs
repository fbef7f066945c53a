//! Video frames, MP4 / PNG / GIF output, and image input with adaptive resolution.
//!
//! Not implemented yet: see the issue "turbo-video".
