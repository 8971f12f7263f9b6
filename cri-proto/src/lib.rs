//! The CRI v1 API (`runtime.v1`): prost messages plus tonic clients and servers
//! for `RuntimeService` and `ImageService`.

#[allow(clippy::all, clippy::pedantic)]
pub mod runtime {
    pub mod v1 {
        tonic::include_proto!("runtime.v1");
    }
}

pub use runtime::v1;
