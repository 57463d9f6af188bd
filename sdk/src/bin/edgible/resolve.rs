//! Objects are referenced on the command line by name or by id; this finds the object meant.

use std::str::FromStr;

use edgible::client::Resource;
use edgible::model::Name;
use edgible::{Client, ClientError};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no {kind} is named or has the id {reference:?}")]
    NotFound { kind: &'static str, reference: String },
    #[error("looking up {kind} {reference:?}")]
    Client {
        kind: &'static str,
        reference: String,
        #[source]
        source: ClientError,
    },
}

/// The object of kind `R` that `reference` names or whose id it is.
///
/// A reference that parses as an id is looked up as one first; a name can look like an id (a
/// UUID whose first character is a letter is a valid name), so on 404 it is tried as a name too.
pub async fn resolve<R>(client: &Client, reference: &str) -> Result<R, ResolveError>
where
    R: Resource,
    R::Id: FromStr,
{
    let client_error = |source| ResolveError::Client { kind: R::KIND, reference: reference.to_owned(), source };
    if let Ok(id) = reference.parse::<R::Id>() {
        match client.get::<R>(&id).await {
            Ok(object) => return Ok(object),
            Err(error) if error.is_not_found() => {}
            Err(error) => return Err(client_error(error)),
        }
    }
    if reference.parse::<Name>().is_ok()
        && let Some(object) = client.find_by_name::<R>(reference).await.map_err(client_error)?
    {
        return Ok(object);
    }
    Err(ResolveError::NotFound { kind: R::KIND, reference: reference.to_owned() })
}
