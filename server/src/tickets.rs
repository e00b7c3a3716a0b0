//! Tickets: the grant that lets a request reach an image. The ticket id is
//! the `{ticket}` path segment and the only credential on the data API.
//! Unknown ids and forbidden operations are 403, as in imageio.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::backend::Backend;
use crate::error::ApiError;

/// Access to one image.
pub struct Ticket {
    /// The id in URLs.
    pub id: String,
    /// Where the image lives.
    pub backend: Arc<Backend>,
    /// PUT and PATCH allowed.
    pub writable: bool,
    /// Zeroing may deallocate.
    pub sparse: bool,
}

impl Ticket {
    /// Refuses writes on a read-only ticket.
    pub fn require_write(&self) -> Result<(), ApiError> {
        if self.writable {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("ticket {:?} is read-only: writing needs the \"write\" op", self.id)))
        }
    }
}

/// All tickets of a server.
#[derive(Default)]
pub struct Tickets {
    tickets: RwLock<HashMap<String, Arc<Ticket>>>,
}

impl Tickets {
    /// Adds or replaces a ticket.
    pub fn insert(&self, ticket: Ticket) {
        self.tickets.write().expect("tickets lock").insert(ticket.id.clone(), Arc::new(ticket));
    }

    /// The ticket with this id, or 403.
    pub fn get(&self, id: &str) -> Result<Arc<Ticket>, ApiError> {
        self.tickets
            .read()
            .expect("tickets lock")
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::Forbidden(format!("no such ticket {id:?}")))
    }

    /// Removes every ticket, returning them (for shutdown).
    pub fn drain(&self) -> Vec<Arc<Ticket>> {
        self.tickets.write().expect("tickets lock").drain().map(|(_, ticket)| ticket).collect()
    }
}
