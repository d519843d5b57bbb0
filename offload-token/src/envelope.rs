//! The MS-FSCC STORAGE_OFFLOAD_TOKEN envelope (MS-FSCC 2.1.11): 512 bytes, TokenType (u32
//! big-endian), two reserved bytes, TokenIdLength (u16 big-endian, 0x01F8) and a 504-byte
//! TokenId. [`RawToken`] is the on-wire layout; [`Envelope`] is what parsing it yields: the
//! well-known zero-data token or a sealed body of this crate's vendor type.

use std::fmt;

use zerocopy::big_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::FormatError;

/// Size of a token.
pub const TOKEN_SIZE: usize = 512;
/// Size of the TokenId field.
pub const TOKEN_ID_SIZE: usize = 504;
/// The only TokenIdLength this crate writes or accepts.
pub const TOKEN_ID_LENGTH: u16 = 0x01F8;
/// STORAGE_OFFLOAD_TOKEN_TYPE_ZERO_DATA: the well-known token whose data reads as zeros.
pub const TOKEN_TYPE_ZERO_DATA: u32 = 0xFFFF_0001;
/// This crate's vendor-specific token type ("VDOT"): an HMAC-sealed body (see
/// [`RawBody`](crate::RawBody)).
pub const TOKEN_TYPE_VDISK: u32 = 0x5644_4F54;
/// Length of the envelope header covered by the seal (type, reserved, id length).
pub const HEADER_SIZE: usize = TOKEN_SIZE - TOKEN_ID_SIZE;

/// The on-wire STORAGE_OFFLOAD_TOKEN. MS-FSCC 2.1.11: TokenType and TokenIdLength are
/// big-endian; TokenId is a byte stream.
#[derive(Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawToken {
    /// TokenType.
    pub token_type: U32,
    /// Reserved; must be zero.
    pub reserved: [u8; 2],
    /// TokenIdLength: 0x01F8.
    pub token_id_length: U16,
    /// TokenId: zeros for the zero-data token, a sealed body otherwise.
    pub token_id: [u8; TOKEN_ID_SIZE],
}

const _: () = assert!(std::mem::size_of::<RawToken>() == TOKEN_SIZE);

impl fmt::Debug for RawToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawToken")
            .field(
                "token_type",
                &format_args!("{:#010x}", self.token_type.get()),
            )
            .field("reserved", &self.reserved)
            .field(
                "token_id_length",
                &format_args!("{:#06x}", self.token_id_length.get()),
            )
            .finish_non_exhaustive()
    }
}

/// A token's 512 bytes, as handed between minter, initiator and redeemer. Holding one says
/// nothing about its validity: [`KeyRing::open`](crate::KeyRing::open) checks that.
#[derive(Clone, PartialEq, Eq)]
pub struct Token([u8; TOKEN_SIZE]);

impl Token {
    /// The well-known zero-data token (TokenType 0xFFFF0001, TokenId all zeros).
    pub fn zero() -> Self {
        let mut b = [0u8; TOKEN_SIZE];
        b[..4].copy_from_slice(&TOKEN_TYPE_ZERO_DATA.to_be_bytes());
        b[6..8].copy_from_slice(&TOKEN_ID_LENGTH.to_be_bytes());
        Token(b)
    }

    /// A token from exactly 512 bytes (nothing else is checked here).
    pub fn from_slice(bytes: &[u8]) -> Result<Self, FormatError> {
        let b: [u8; TOKEN_SIZE] = bytes
            .try_into()
            .map_err(|_| FormatError::WrongSize(bytes.len()))?;
        Ok(Token(b))
    }

    /// A token from its bytes.
    pub const fn from_bytes(bytes: [u8; TOKEN_SIZE]) -> Self {
        Token(bytes)
    }

    /// The 512 bytes.
    pub fn as_bytes(&self) -> &[u8; TOKEN_SIZE] {
        &self.0
    }

    /// The on-wire view.
    pub fn raw(&self) -> &RawToken {
        // A 512-byte array always matches the unaligned 512-byte RawToken.
        zerocopy::transmute_ref!(&self.0)
    }

    /// The TokenId bytes viewed as a sealed body, whatever the type (for inspection: nothing
    /// in it is verified).
    pub fn raw_body(&self) -> &crate::body::RawBody {
        zerocopy::transmute_ref!(&self.raw().token_id)
    }

    /// Parses the envelope (not the seal).
    pub fn envelope(&self) -> Result<Envelope, FormatError> {
        Envelope::try_from(self.raw())
    }

    /// Whether this is, byte for byte, the well-known zero-data token.
    pub fn is_zero(&self) -> bool {
        *self == Token::zero()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Token(type {:#010x}, {}..)",
            self.raw().token_type.get(),
            crate::hex::encode(&self.0[8..24])
        )
    }
}

/// A parsed envelope.
#[derive(Clone, PartialEq, Eq)]
pub enum Envelope {
    /// STORAGE_OFFLOAD_TOKEN_TYPE_ZERO_DATA: the data reads as zeros.
    Zero,
    /// This crate's vendor type: the 8-byte header and the 504-byte sealed body, not yet
    /// verified.
    Sealed {
        /// TokenType, reserved and TokenIdLength as on the wire (covered by the seal).
        header: [u8; HEADER_SIZE],
        /// The TokenId bytes.
        body: Box<[u8; TOKEN_ID_SIZE]>,
    },
}

impl fmt::Debug for Envelope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Envelope::Zero => f.write_str("Envelope::Zero"),
            Envelope::Sealed { .. } => f.write_str("Envelope::Sealed"),
        }
    }
}

impl TryFrom<&RawToken> for Envelope {
    type Error = FormatError;

    fn try_from(raw: &RawToken) -> Result<Self, FormatError> {
        let ty = raw.token_type.get();
        // MS-FSCC 2.1.11: TokenType is the zero-data type or a vendor-specific one; we
        // accept only our own vendor type.
        if ty != TOKEN_TYPE_ZERO_DATA && ty != TOKEN_TYPE_VDISK {
            return Err(FormatError::UnknownType(ty));
        }
        if raw.reserved != [0, 0] {
            return Err(FormatError::ReservedNotZero);
        }
        let idlen = raw.token_id_length.get();
        if idlen != TOKEN_ID_LENGTH {
            return Err(FormatError::BadIdLength(idlen));
        }
        if ty == TOKEN_TYPE_ZERO_DATA {
            // The zero-data token's TokenId is reserved: all zeros.
            if raw.token_id.iter().any(|&b| b != 0) {
                return Err(FormatError::ZeroTokenNotBlank);
            }
            return Ok(Envelope::Zero);
        }
        let mut header = [0u8; HEADER_SIZE];
        header.copy_from_slice(&raw.as_bytes()[..HEADER_SIZE]);
        Ok(Envelope::Sealed {
            header,
            body: Box::new(raw.token_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_token_layout() {
        let z = Token::zero();
        assert_eq!(&z.as_bytes()[..8], &[0xFF, 0xFF, 0, 1, 0, 0, 0x01, 0xF8]);
        assert!(z.as_bytes()[8..].iter().all(|&b| b == 0));
        assert_eq!(z.envelope().unwrap(), Envelope::Zero);
        assert!(z.is_zero());
    }

    #[test]
    fn envelope_is_strict() {
        let mut b = *Token::zero().as_bytes();
        b[100] = 1;
        assert_eq!(
            Token::from_bytes(b).envelope(),
            Err(FormatError::ZeroTokenNotBlank)
        );
        let mut b = *Token::zero().as_bytes();
        b[5] = 1;
        assert_eq!(
            Token::from_bytes(b).envelope(),
            Err(FormatError::ReservedNotZero)
        );
        let mut b = *Token::zero().as_bytes();
        b[7] = 0xF9;
        assert_eq!(
            Token::from_bytes(b).envelope(),
            Err(FormatError::BadIdLength(0x1F9))
        );
        let mut b = *Token::zero().as_bytes();
        b[0] = 0;
        assert_eq!(
            Token::from_bytes(b).envelope(),
            Err(FormatError::UnknownType(0x00FF_0001))
        );
        assert_eq!(
            Token::from_slice(&[0u8; 511]),
            Err(FormatError::WrongSize(511))
        );
    }
}
