//! The wire types of go-plugin and of OpenBao's backend plugin protocol,
//! generated from `proto/`. A request's parameters, a reply's data and a
//! storage entry print as `[redacted]` under `Debug`: each can hold a
//! secret (a value to import, a credential, the backend token).

#![allow(clippy::all, clippy::pedantic, reason = "generated code")]

/// go-plugin: broker, controller, stdio.
pub mod plugin {
    tonic::include_proto!("plugin");
}

/// OpenBao's plugin version service.
pub mod logical {
    tonic::include_proto!("logical");
}

/// OpenBao's backend plugin protocol: the Backend and Storage services.
pub mod pb {
    tonic::include_proto!("pb");

    impl std::fmt::Debug for Request {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Request")
                .field("id", &self.id)
                .field("operation", &self.operation)
                .field("path", &self.path)
                .field("data", &"[redacted]")
                .finish_non_exhaustive()
        }
    }

    impl std::fmt::Debug for Response {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Response")
                .field("data", &"[redacted]")
                .field("warnings", &self.warnings)
                .finish()
        }
    }

    impl std::fmt::Debug for StorageEntry {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("StorageEntry")
                .field("key", &self.key)
                .field("value", &"[redacted]")
                .field("seal_wrap", &self.seal_wrap)
                .finish()
        }
    }
}
