//! The logical backend service the host calls: set-up with the mount's
//! storage, requests routed to [`crate::paths`], the mount's special
//! paths, and the plugin's type and version.

use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::sync::RwLock;
use tonic::{Request, Response, Status};

use crate::config::{Backend, CONFIG_KEY, Config, Storage};
use crate::error::PluginError;
use crate::goplugin::Broker;
use crate::log;
use crate::params::Params;
use crate::paths::{self, Answer, Call, Caller};
use crate::proto::logical::{self, plugin_version_server::PluginVersion};
use crate::proto::pb::{
    self, HandleExistenceCheckArgs, HandleExistenceCheckReply, HandleRequestArgs,
    HandleRequestReply, InitializeArgs, InitializeReply, InvalidateKeyArgs, Paths, SetupArgs,
    SetupReply, SpecialPathsReply, TypeReply, backend_server::Backend as BackendService,
    storage_client::StorageClient,
};

/// A secrets engine (go: `logical.TypeLogical`).
const TYPE_LOGICAL: u32 = 1;

/// The plugin's version as the host shows it (`running_plugin_version`).
pub const PLUGIN_VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"));

pub struct Engine {
    broker: Arc<Broker>,
    storage: RwLock<Option<Storage>>,
    /// The connection made from the stored configuration, and the
    /// configuration's generation: a change bumps it and drops the
    /// connection, and a connection made from an older one is not kept.
    connection: Mutex<(u64, Option<Backend>)>,
}

impl Engine {
    pub fn new(broker: Arc<Broker>) -> Arc<Engine> {
        Arc::new(Engine {
            broker,
            storage: RwLock::new(None),
            connection: Mutex::new((0, None)),
        })
    }

    async fn storage(&self) -> Result<Storage, PluginError> {
        self.storage
            .read()
            .await
            .clone()
            .ok_or_else(|| PluginError::internal("the plugin was not set up by its host"))
    }

    fn forget_connection(&self) {
        let mut c = self.connection.lock().expect("connection lock");
        *c = (c.0 + 1, None);
    }

    async fn connection(&self, storage: &Storage) -> Result<Backend, PluginError> {
        let generation = {
            let c = self.connection.lock().expect("connection lock");
            if let Some(b) = &c.1 {
                return Ok(b.clone());
            }
            c.0
        };
        let Some(config) = storage.load().await? else {
            return Err(PluginError::new(
                412,
                "the mount is not configured: write the rekey backend's address and a token to its config path first",
            ));
        };
        let b = config.connect()?;
        let mut c = self.connection.lock().expect("connection lock");
        if c.0 == generation {
            c.1 = Some(b.clone());
        }
        Ok(b)
    }

    async fn handle(&self, req: pb::Request) -> Answer {
        let caller = Caller {
            request_id: req.id,
            entity_id: req.entity_id,
            display_name: req.display_name,
        };
        let path = req.path;
        // Writes arrive as "update" (no existence check); "create" is the
        // same thing.
        let op = match req.operation.as_str() {
            "create" => "update",
            other => other,
        };
        match op {
            "help" => return Ok(Some(json!({ "help": paths::help(&path), "see_also": [] }))),
            "read" | "update" | "delete" | "list" => {}
            // The host asks every mount some operations (a periodic
            // "rollback", "resolve-path" for policies) and expects this
            // answer when the backend has nothing to do for them.
            other => return Err(PluginError::unsupported(other, &path)),
        }
        let params = Params::parse(req.data)?;
        let Some((route, id)) = paths::route(&path) else {
            return Err(PluginError::new(
                404,
                format!(
                    "no path {path:?} in the rekey secrets engine; see its help for the paths it has"
                ),
            ));
        };
        if !route.operations.contains(&op) {
            return Err(PluginError::unsupported(op, &path));
        }
        let storage = self.storage().await?;
        if route.name == "config" {
            return match op {
                "read" => Ok(storage.load().await?.map(|c| c.public_json())),
                "delete" => {
                    storage.delete().await?;
                    self.forget_connection();
                    Ok(None)
                }
                _ => {
                    let config: Config = paths::merge_config(storage.load().await?, &params)?;
                    storage.save(&config).await?;
                    self.forget_connection();
                    Ok(None)
                }
            };
        }
        let backend = self.connection(&storage).await?;
        let call = Call {
            backend: &backend,
            caller: &caller,
        };
        let id = id.unwrap_or_default();
        match (route.name, op) {
            ("secrets/", _) => call.list(id).await,
            ("secrets", "read") => call.read_secret(id, &params).await,
            ("secrets", _) => call.create(id, params).await,
            ("rotate", _) => call.rotate(id, params).await,
            ("rollback", _) => call.rollback(id, &params).await,
            ("revoke", _) => call.revoke(id, &params).await,
            ("creds", _) => call.creds(id, &params).await,
            ("status", _) => call.status(id, &params).await,
            _ => Err(PluginError::unsupported(op, &path)),
        }
    }
}

#[tonic::async_trait]
impl BackendService for Arc<Engine> {
    async fn handle_request(
        &self,
        request: Request<HandleRequestArgs>,
    ) -> Result<Response<HandleRequestReply>, Status> {
        let Some(req) = request.into_inner().request else {
            return Err(Status::invalid_argument("no request"));
        };
        let (op, path) = (req.operation.clone(), req.path.clone());
        let reply = match self.handle(req).await {
            Ok(data) => HandleRequestReply {
                response: data.map(|d| pb::Response {
                    data: d.to_string(),
                    warnings: Vec::new(),
                }),
                err: None,
            },
            Err(e) => {
                if e.status >= 500 {
                    log::warn(&format!("{op} {path}: {}", e.message));
                }
                HandleRequestReply {
                    response: None,
                    err: Some(e.to_proto()),
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn special_paths(
        &self,
        _request: Request<pb::Empty>,
    ) -> Result<Response<SpecialPathsReply>, Status> {
        Ok(Response::new(SpecialPathsReply {
            paths: Some(Paths {
                // The backend token is encrypted again by a seal that can.
                seal_wrap_storage: vec![CONFIG_KEY.into()],
                ..Paths::default()
            }),
        }))
    }

    async fn handle_existence_check(
        &self,
        _request: Request<HandleExistenceCheckArgs>,
    ) -> Result<Response<HandleExistenceCheckReply>, Status> {
        // No existence checks: every write is an "update" to policies.
        Ok(Response::new(HandleExistenceCheckReply {
            check_found: false,
            exists: false,
            err: None,
        }))
    }

    async fn cleanup(&self, _request: Request<pb::Empty>) -> Result<Response<pb::Empty>, Status> {
        *self.storage.write().await = None;
        self.forget_connection();
        Ok(Response::new(pb::Empty {}))
    }

    async fn invalidate_key(
        &self,
        request: Request<InvalidateKeyArgs>,
    ) -> Result<Response<pb::Empty>, Status> {
        if request.into_inner().key == CONFIG_KEY {
            self.forget_connection();
        }
        Ok(Response::new(pb::Empty {}))
    }

    async fn setup(&self, request: Request<SetupArgs>) -> Result<Response<SetupReply>, Status> {
        let broker_id = request.into_inner().broker_id;
        let err = match self.broker.dial(broker_id).await {
            Ok(channel) => {
                *self.storage.write().await = Some(Storage(
                    StorageClient::new(channel).max_decoding_message_size(usize::MAX),
                ));
                self.forget_connection();
                String::new()
            }
            Err(e) => {
                log::error(&format!("set-up: {e}"));
                e
            }
        };
        Ok(Response::new(SetupReply { err }))
    }

    async fn initialize(
        &self,
        _request: Request<InitializeArgs>,
    ) -> Result<Response<InitializeReply>, Status> {
        Ok(Response::new(InitializeReply { err: None }))
    }

    async fn r#type(&self, _request: Request<pb::Empty>) -> Result<Response<TypeReply>, Status> {
        Ok(Response::new(TypeReply {
            r#type: TYPE_LOGICAL,
        }))
    }
}

/// `logical.PluginVersion`: the version the host records for the mount.
pub struct Version;

#[tonic::async_trait]
impl PluginVersion for Version {
    async fn version(
        &self,
        _request: Request<logical::Empty>,
    ) -> Result<Response<logical::VersionReply>, Status> {
        Ok(Response::new(logical::VersionReply {
            plugin_version: PLUGIN_VERSION.into(),
        }))
    }
}
