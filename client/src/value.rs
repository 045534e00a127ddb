//! What goes in ([`ToArg`]) and what comes out ([`Value`], read as a Rust type through
//! [`FromValue`]).
//!
//! Answers are typed the way Redis types its replies, so code written against redis-rs reads
//! the same here: a `get` answers [`Value::Data`] or [`Value::Nil`], a `del` an integer, a
//! conditional `set` [`Value::Okay`] or [`Value::Nil`]. The caller picks the Rust type at the
//! call site (`get::<String>`, `bool` for a conditional write), and a conversion that does not
//! fit is an [`Error::Type`], never a panic or a silent default.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash};

use bytes::{Bytes, BytesMut};

use crate::Error;

/// An answer from the server, before it is read as a Rust type.
///
/// New variants may be added (RESP3 shapes as the server gains commands that answer them), so
/// a `match` needs a `_` arm.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Value {
    /// Nothing: a missing key, a conditional write that did not happen.
    Nil,
    /// An integer (`del` and `exists` answer 1 or 0).
    Int(i64),
    /// Bytes: a stored value.
    Data(Bytes),
    /// The plain success of a write.
    Okay,
    /// A short status text (`PONG`).
    Status(String),
    /// Several answers in order (a pipeline's, or a command's that answers many).
    Array(Vec<Value>),
    /// Pairs (RESP3 maps).
    Map(Vec<(Value, Value)>),
    /// A set of answers (RESP3 sets).
    Set(Vec<Value>),
    /// A floating-point number (RESP3 doubles).
    Double(f64),
    /// A boolean (RESP3 booleans).
    Boolean(bool),
    /// An error answer inside an aggregate (one command of a transaction that failed).
    Error(String),
}

impl Value {
    /// Whether this is [`Value::Nil`].
    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    /// The bytes of a [`Value::Data`] or [`Value::Status`].
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Data(b) => Some(b),
            Value::Status(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// Reads this value as `T` (the same as `T::from_value(self)`).
    pub fn into_typed<T: FromValue>(self) -> Result<T, Error> {
        T::from_value(self)
    }

    /// What the value is, for an error message: never its contents, which may be secret.
    fn describe(&self) -> String {
        match self {
            Value::Nil => "nil (no such key, or nothing written)".into(),
            Value::Int(n) => format!("the integer {n}"),
            Value::Data(b) => format!("a value of {} bytes", b.len()),
            Value::Okay => "OK".into(),
            Value::Status(s) => format!("the status {s:?}"),
            Value::Array(v) => format!("an array of {}", v.len()),
            Value::Map(v) => format!("a map of {}", v.len()),
            Value::Set(v) => format!("a set of {}", v.len()),
            Value::Double(d) => format!("the number {d}"),
            Value::Boolean(b) => format!("the boolean {b}"),
            Value::Error(e) => format!("the error {e:?}"),
        }
    }
}

/// A Rust type an answer can be read as: [`Bytes`], `Vec<u8>`, `String`, the integer and
/// floating-point types, `bool`, `()`, [`Value`] itself, `Option<T>` (where a missing key is
/// `None`), `Vec<Value>`, maps (`HashMap<K, V>`, `BTreeMap<K, V>`, `Vec<(K, V)>`, from a RESP3
/// map or a RESP2 array of keys and values in turn), and tuples for a
/// [`Pipeline`](crate::Pipeline)'s answers.
///
/// Implement it for your own types to read them straight out of a call:
///
/// ```
/// use twincache_client::{Error, FromValue, Value};
///
/// struct Celsius(f64);
///
/// impl FromValue for Celsius {
///     fn from_value(v: Value) -> Result<Self, Error> {
///         f64::from_value(v).map(Celsius)
///     }
/// }
///
/// assert_eq!(Celsius::from_value(Value::Data("21.5".into())).unwrap().0, 21.5);
/// ```
pub trait FromValue: Sized {
    /// Reads `v` as `Self`, or says why it cannot be.
    fn from_value(v: Value) -> Result<Self, Error>;
}

fn mismatch<T>(target: &'static str, v: &Value) -> Result<T, Error> {
    Err(Error::type_error(target, v.describe()))
}

impl FromValue for Value {
    fn from_value(v: Value) -> Result<Self, Error> {
        Ok(v)
    }
}

impl FromValue for Bytes {
    /// Data as it is (no copy); a status, integer or number as its text.
    fn from_value(v: Value) -> Result<Self, Error> {
        match v {
            Value::Data(b) => Ok(b),
            Value::Okay => Ok(Bytes::from_static(b"OK")),
            Value::Status(s) => Ok(s.into()),
            Value::Int(n) => Ok(n.to_string().into()),
            Value::Double(d) => Ok(d.to_string().into()),
            other => mismatch("bytes", &other),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: Value) -> Result<Self, Error> {
        Bytes::from_value(v).map(Vec::from)
    }
}

impl FromValue for String {
    fn from_value(v: Value) -> Result<Self, Error> {
        let bytes = Vec::from_value(v).map_err(|e| retarget(e, "String"))?;
        String::from_utf8(bytes).map_err(|e| {
            Error::type_error(
                "String",
                format!(
                    "a value of {} bytes that is not UTF-8 (read it as Bytes or Vec<u8>)",
                    e.as_bytes().len()
                ),
            )
        })
    }
}

/// The same error, naming the type the caller asked for rather than the one used on the way.
fn retarget(e: Error, target: &'static str) -> Error {
    match e {
        Error::Type { reason, .. } => Error::Type { target, reason },
        other => other,
    }
}

/// Integers come as integers, or as stored values holding decimal text (what `set` of an
/// integer stores), as Redis reads them for `INCR`.
macro_rules! from_value_int {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: Value) -> Result<Self, Error> {
                let target = stringify!($t);
                let n: Option<$t> = match &v {
                    Value::Int(n) => <$t>::try_from(*n).ok(),
                    Value::Boolean(b) => Some(<$t>::from(*b)),
                    Value::Data(_) | Value::Status(_) => std::str::from_utf8(v.as_bytes().unwrap_or_default())
                        .ok()
                        .and_then(|s| s.parse().ok()),
                    _ => None,
                };
                match n {
                    Some(n) => Ok(n),
                    None => mismatch(target, &v),
                }
            }
        }
    )*};
}

from_value_int!(i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, u128, usize);

macro_rules! from_value_float {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: Value) -> Result<Self, Error> {
                let n: Option<$t> = match &v {
                    Value::Double(d) => Some(*d as $t),
                    Value::Int(n) => Some(*n as $t),
                    Value::Data(_) | Value::Status(_) => std::str::from_utf8(v.as_bytes().unwrap_or_default())
                        .ok()
                        .and_then(|s| s.parse().ok()),
                    _ => None,
                };
                match n {
                    Some(n) => Ok(n),
                    None => mismatch(stringify!($t), &v),
                }
            }
        }
    )*};
}

from_value_float!(f32, f64);

impl FromValue for bool {
    /// Whether something happened: `OK` and 1 are true, nil and 0 false (a conditional `set`,
    /// a `del`, an `exists`).
    fn from_value(v: Value) -> Result<Self, Error> {
        match &v {
            Value::Nil => Ok(false),
            Value::Okay => Ok(true),
            Value::Boolean(b) => Ok(*b),
            Value::Int(0) => Ok(false),
            Value::Int(1) => Ok(true),
            Value::Data(d) if d[..] == b"0"[..] => Ok(false),
            Value::Data(d) if d[..] == b"1"[..] => Ok(true),
            _ => mismatch("bool", &v),
        }
    }
}

impl FromValue for () {
    /// Any answer but an error: for calls whose answer does not matter.
    fn from_value(v: Value) -> Result<Self, Error> {
        match v {
            Value::Error(_) => mismatch("()", &v),
            _ => Ok(()),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    /// `None` for nil (a missing key), else the value read as `T`.
    fn from_value(v: Value) -> Result<Self, Error> {
        match v {
            Value::Nil => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

impl FromValue for Vec<Value> {
    /// The elements of an array or set, a map's keys and values in turn, or nothing for nil.
    fn from_value(v: Value) -> Result<Self, Error> {
        match v {
            Value::Array(items) | Value::Set(items) => Ok(items),
            Value::Map(pairs) => Ok(pairs.into_iter().flat_map(|(k, v)| [k, v]).collect()),
            Value::Nil => Ok(Vec::new()),
            other => mismatch("Vec<Value>", &other),
        }
    }
}

/// The pairs of a RESP3 map, or of a RESP2 flat array of keys and values in turn (what
/// `HGETALL` answers), each read as `(K, V)`; nothing for nil.
fn pairs<K: FromValue, V: FromValue>(
    target: &'static str,
    v: Value,
) -> Result<impl Iterator<Item = Result<(K, V), Error>>, Error> {
    let pairs = match v {
        Value::Map(pairs) => pairs,
        Value::Array(items) if items.len() % 2 == 0 => {
            let mut items = items.into_iter();
            std::iter::from_fn(|| Some((items.next()?, items.next()?))).collect()
        }
        Value::Nil => Vec::new(),
        other => return mismatch(target, &other),
    };
    Ok(pairs
        .into_iter()
        .map(|(k, v)| Ok((K::from_value(k)?, V::from_value(v)?))))
}

impl<K, V, S> FromValue for HashMap<K, V, S>
where
    K: FromValue + Eq + Hash,
    V: FromValue,
    S: BuildHasher + Default,
{
    /// A map, or an array of keys and values in turn (`HGETALL` in RESP2).
    fn from_value(v: Value) -> Result<Self, Error> {
        pairs("HashMap", v)?.collect()
    }
}

impl<K: FromValue + Ord, V: FromValue> FromValue for BTreeMap<K, V> {
    /// A map, or an array of keys and values in turn (`HGETALL` in RESP2).
    fn from_value(v: Value) -> Result<Self, Error> {
        pairs("BTreeMap", v)?.collect()
    }
}

impl<K: FromValue, V: FromValue> FromValue for Vec<(K, V)> {
    /// A map's pairs in the order the server gave them, or an array of keys and values in
    /// turn.
    fn from_value(v: Value) -> Result<Self, Error> {
        pairs("Vec<(K, V)>", v)?.collect()
    }
}

/// Tuples read an array of exactly their length, element by element: a pipeline's answers.
macro_rules! from_value_tuple {
    ($n:literal: $($t:ident),+) => {
        impl<$($t: FromValue),+> FromValue for ($($t,)+) {
            fn from_value(v: Value) -> Result<Self, Error> {
                let items = match v {
                    Value::Array(items) if items.len() == $n => items,
                    other => return mismatch(concat!("a tuple of ", $n), &other),
                };
                let mut items = items.into_iter();
                Ok(($($t::from_value(items.next().expect("length checked"))?,)+))
            }
        }
    };
}

from_value_tuple!(1: A);
from_value_tuple!(2: A, B);
from_value_tuple!(3: A, B, C);
from_value_tuple!(4: A, B, C, D);
from_value_tuple!(5: A, B, C, D, E);
from_value_tuple!(6: A, B, C, D, E, F);
from_value_tuple!(7: A, B, C, D, E, F, G);
from_value_tuple!(8: A, B, C, D, E, F, G, H);
from_value_tuple!(9: A, B, C, D, E, F, G, H, I);
from_value_tuple!(10: A, B, C, D, E, F, G, H, I, J);
from_value_tuple!(11: A, B, C, D, E, F, G, H, I, J, K);
from_value_tuple!(12: A, B, C, D, E, F, G, H, I, J, K, L);

/// Something that can be sent as a value: any borrowed bytes or text (`&str`, `&String`,
/// `&[u8]`, `&Vec<u8>`, `b"..."`), an owned buffer (`Bytes`, `Vec<u8>`, `String`, taken without
/// a copy), or a number or `bool` (sent as its decimal text, as Redis stores it).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let cluster = twincache_orchestrator::local::LocalCluster::start(1).await?;
/// # let client = twincache_client::Client::connect(&cluster.addr().to_string()).await?;
/// let name = String::from("ada");
/// client.set("user:1", &name).await?; // borrowed: `name` is still ours
/// client.set("user:2", name.as_str()).await?;
/// client.set("visits", 41).await?;
/// assert_eq!(client.get::<i64>("visits").await?, Some(41));
/// # Ok(())
/// # }
/// ```
pub trait ToArg {
    /// The bytes to send.
    fn into_arg(self) -> Bytes;
}

impl<T: AsRef<[u8]> + ?Sized> ToArg for &T {
    fn into_arg(self) -> Bytes {
        Bytes::copy_from_slice(self.as_ref())
    }
}

impl<const N: usize> ToArg for [u8; N] {
    fn into_arg(self) -> Bytes {
        Bytes::copy_from_slice(&self)
    }
}

macro_rules! to_arg_owned {
    ($($t:ty),*) => {$(
        impl ToArg for $t {
            fn into_arg(self) -> Bytes {
                Bytes::from(self)
            }
        }
    )*};
}

to_arg_owned!(Bytes, Vec<u8>, String, Box<[u8]>);

impl ToArg for BytesMut {
    fn into_arg(self) -> Bytes {
        self.freeze()
    }
}

impl ToArg for Box<str> {
    fn into_arg(self) -> Bytes {
        Bytes::from(self.into_string())
    }
}

impl ToArg for Cow<'_, str> {
    fn into_arg(self) -> Bytes {
        match self {
            Cow::Borrowed(s) => Bytes::copy_from_slice(s.as_bytes()),
            Cow::Owned(s) => Bytes::from(s),
        }
    }
}

impl ToArg for Cow<'_, [u8]> {
    fn into_arg(self) -> Bytes {
        match self {
            Cow::Borrowed(s) => Bytes::copy_from_slice(s),
            Cow::Owned(s) => Bytes::from(s),
        }
    }
}

macro_rules! to_arg_display {
    ($($t:ty),*) => {$(
        impl ToArg for $t {
            fn into_arg(self) -> Bytes {
                Bytes::from(self.to_string())
            }
        }
    )*};
}

to_arg_display!(i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, u128, usize, f32, f64);

impl ToArg for bool {
    /// `1` or `0`, as Redis stores a boolean.
    fn into_arg(self) -> Bytes {
        Bytes::from_static(if self { b"1" } else { b"0" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(s: &str) -> Value {
        Value::Data(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn strings_and_bytes() {
        assert_eq!(String::from_value(data("héllo")).unwrap(), "héllo");
        assert_eq!(Vec::<u8>::from_value(data("ab")).unwrap(), b"ab");
        assert_eq!(Bytes::from_value(Value::Int(-3)).unwrap(), "-3");
        assert_eq!(String::from_value(Value::Okay).unwrap(), "OK");
        let not_utf8 = String::from_value(Value::Data(Bytes::from_static(b"\xff"))).unwrap_err();
        assert!(
            matches!(
                not_utf8,
                Error::Type {
                    target: "String",
                    ..
                }
            ),
            "{not_utf8}"
        );
        // A missing key read as a non-Option type says so, without the value's contents.
        let nil = String::from_value(Value::Nil).unwrap_err();
        assert!(nil.to_string().contains("nil"), "{nil}");
        assert_eq!(Option::<String>::from_value(Value::Nil).unwrap(), None);
        assert_eq!(
            Option::<String>::from_value(data("x")).unwrap(),
            Some("x".into())
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(i64::from_value(data("-42")).unwrap(), -42);
        assert_eq!(u8::from_value(Value::Int(255)).unwrap(), 255);
        assert!(u8::from_value(Value::Int(256)).is_err());
        assert!(u32::from_value(Value::Int(-1)).is_err());
        assert!(i64::from_value(data("4x")).is_err());
        assert!(i64::from_value(Value::Nil).is_err());
        assert_eq!(f64::from_value(data("2.5")).unwrap(), 2.5);
        assert_eq!(f64::from_value(Value::Int(2)).unwrap(), 2.0);
        assert_eq!(f32::from_value(Value::Double(0.5)).unwrap(), 0.5);
        assert_eq!(i64::from_value(Value::Boolean(true)).unwrap(), 1);
    }

    #[test]
    fn booleans_say_whether_something_happened() {
        assert!(bool::from_value(Value::Okay).unwrap());
        assert!(!bool::from_value(Value::Nil).unwrap());
        assert!(bool::from_value(Value::Int(1)).unwrap());
        assert!(!bool::from_value(Value::Int(0)).unwrap());
        assert!(bool::from_value(Value::Int(2)).is_err());
        assert!(bool::from_value(data("yes")).is_err());
    }

    #[test]
    fn tuples_read_arrays_of_their_length() {
        let v = Value::Array(vec![Value::Okay, data("7"), Value::Nil, Value::Int(1)]);
        let (a, b, c, d): ((), i64, Option<String>, bool) =
            FromValue::from_value(v.clone()).unwrap();
        assert_eq!((a, b, c, d), ((), 7, None, true));
        assert!(<(i64, i64)>::from_value(v.clone()).is_err());
        assert_eq!(Vec::<Value>::from_value(v).unwrap().len(), 4);
        assert!(<()>::from_value(Value::Error("ERR x".into())).is_err());
    }

    #[test]
    fn maps_read_resp3_maps_and_resp2_pairs() {
        let flat = Value::Array(vec![data("a"), data("1"), data("b"), data("2")]);
        let map = Value::Map(vec![(data("a"), data("1")), (data("b"), data("2"))]);
        for v in [flat, map] {
            let m: HashMap<String, i64> = FromValue::from_value(v.clone()).unwrap();
            assert_eq!((m["a"], m["b"]), (1, 2));
            let m: BTreeMap<String, String> = FromValue::from_value(v.clone()).unwrap();
            assert_eq!(m.into_iter().next(), Some(("a".into(), "1".into())));
            let p: Vec<(String, i64)> = FromValue::from_value(v).unwrap();
            assert_eq!(p, [("a".into(), 1), ("b".into(), 2)]);
        }
        assert!(HashMap::<String, String>::from_value(Value::Nil)
            .unwrap()
            .is_empty());
        let odd = Value::Array(vec![data("a")]);
        assert!(HashMap::<String, String>::from_value(odd).is_err());
        assert!(Vec::<(String, String)>::from_value(Value::Int(1)).is_err());
        let bad_value = Value::Array(vec![data("a"), data("x")]);
        assert!(HashMap::<String, i64>::from_value(bad_value).is_err());
    }

    #[test]
    fn args_borrow_or_take() {
        let s = String::from("abc");
        assert_eq!((&s).into_arg(), "abc");
        assert_eq!(s.as_str().into_arg(), "abc");
        assert_eq!(b"k\0"[..].as_ref().into_arg(), &b"k\0"[..]);
        assert_eq!(b"k\0".into_arg(), &b"k\0"[..]);
        assert_eq!(*b"ab".to_owned().into_arg(), *b"ab");
        assert_eq!(41u16.into_arg(), "41");
        assert_eq!((-7i64).into_arg(), "-7");
        assert_eq!(1.5f64.into_arg(), "1.5");
        assert_eq!(true.into_arg(), "1");
        assert_eq!(Cow::Borrowed("x").into_arg(), "x");
        // Owned buffers are taken as they are.
        let owned = Bytes::from(vec![1u8; 64]);
        let ptr = owned.as_ptr();
        assert_eq!(owned.into_arg().as_ptr(), ptr);
    }
}
