//! Event codes (WIRE.md §4): what an event means to the sync engine, and a
//! readable name for log shipping.
//!
//! Codes whose low byte is part of the code (0x4502 …) may arrive whole with
//! sub-code 0 or split into 0x4500 / 0x02 (WIRE.md B29, §5.9 open); every
//! check here accepts both.

/// What an event means for the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Meaning {
    /// A user was enrolled, updated or deleted (0x2000, 0x2200, 0x2400,
    /// 0x2900).
    UserChanged,
    /// Every user was deleted (0x2600).
    AllUsersDeleted,
    /// The device's log or database was wiped (0x4200, 0x4501, 0x4502,
    /// 0x4504): users or events may have changed unseen.
    Reset,
    Other,
}

/// The code with a split-off low byte folded back in.
fn full_code(event_code: u32, sub_code: u32) -> u32 {
    if event_code & 0xFF == 0 && (0x4500..0x4600).contains(&event_code) {
        event_code | (sub_code & 0xFF)
    } else {
        event_code
    }
}

pub fn meaning(event_code: u32, sub_code: u32) -> Meaning {
    match full_code(event_code, sub_code) {
        0x2000 | 0x2200 | 0x2400 | 0x2900 => Meaning::UserChanged,
        0x2600 => Meaning::AllUsersDeleted,
        0x4200 | 0x4501 | 0x4502 | 0x4504 => Meaning::Reset,
        _ => Meaning::Other,
    }
}

/// Whether the event concerns users (for `log.events = "user"`).
pub fn is_user_event(event_code: u32) -> bool {
    (0x2000..0x2B00).contains(&event_code)
}

/// A readable name in the style of Suprema's examples.
pub fn name(event_code: u32, sub_code: u32) -> String {
    let code = full_code(event_code, sub_code);
    // Codes are 16 bits (WIRE.md §4): a wider one is named by no table,
    // whatever its low 16 bits say.
    let main = match if code > 0xFFFF { 0 } else { code & 0xFF00 } {
        0x1000 => "Verify success",
        0x1100 => "Verify failure",
        0x1200 => "Verify success under duress",
        0x1300 => "Identify success",
        0x1400 => "Identify failure",
        0x1500 => "Identify success under duress",
        0x1600 => "Dual authentication success",
        0x1700 => "Dual authentication failure",
        0x1800 => "Authentication failure",
        0x1900 => "Access denied",
        0x1A00 => "Fake finger detected",
        0x1B00 => "Bypass success",
        0x1C00 => "Bypass failure",
        0x1D00 => "Abnormal temperature detected",
        0x1E00 => "Unmasked face detected",
        0x2000 => "User enrollment success",
        0x2100 => "User enrollment failure",
        0x2200 => "User update success",
        0x2300 => "User update failure",
        0x2400 => "User delete success",
        0x2500 => "User delete failure",
        0x2600 => "All users deleted",
        0x2700 => "Access-on-card issued",
        0x2800 => "Duplicate credential",
        0x2900 => "User partial update success",
        0x2A00 => "User partial update failure",
        0x3000 => "Device reset",
        0x3100 => "Device started",
        0x3200 => match code {
            0x3201 => "Timezone set",
            0x3202 => "DST set",
            _ => "Time set",
        },
        0x3300 => "Network link connected",
        0x3400 => "Network link disconnected",
        0x3500 => "DHCP address obtained",
        0x3600 => "Admin menu entered",
        0x3700 => "Device locked",
        0x3800 => "Device unlocked",
        0x3B00 => "TCP connected",
        0x3C00 => "TCP disconnected",
        0x3D00 => "RS-485 connected",
        0x3E00 => "RS-485 disconnected",
        0x3F00 => "Input detected",
        0x4000 => "Tamper on",
        0x4100 => "Tamper off",
        0x4200 => "Event log cleared",
        0x4300 => "Firmware upgraded",
        0x4400 => "Resource upgraded",
        0x4500 => match code {
            0x4501 => "Database reset",
            0x4502 => "Factory reset",
            0x4503 => "Configuration reset (network kept)",
            0x4504 => "Factory reset (network kept)",
            _ => "Configuration reset",
        },
        0x4600 => "Supervised input short",
        0x4700 => "Supervised input open",
        0x5000..=0x5E00 => "Door event",
        0x6000..=0x6F00 | 0x9000..=0x9B00 => "Zone event",
        0x7000..=0x7900 => "Lift event",
        _ => "",
    };
    if main.is_empty() {
        format!("Event 0x{event_code:04X}/{sub_code:02X}")
    } else if sub_code != 0 && code == event_code && !(0x4500..0x4600).contains(&code) {
        format!("{main} (sub-code 0x{sub_code:02X})")
    } else {
        main.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meanings_accept_both_encodings() {
        assert_eq!(meaning(0x2000, 0), Meaning::UserChanged);
        assert_eq!(meaning(0x2200, 0), Meaning::UserChanged);
        assert_eq!(meaning(0x2400, 0), Meaning::UserChanged);
        assert_eq!(
            meaning(0x2100, 0),
            Meaning::Other,
            "a failed enrollment changes nothing"
        );
        assert_eq!(meaning(0x2600, 0), Meaning::AllUsersDeleted);
        assert_eq!(meaning(0x4200, 0), Meaning::Reset);
        assert_eq!(meaning(0x4502, 0), Meaning::Reset);
        assert_eq!(meaning(0x4500, 0x02), Meaning::Reset);
        assert_eq!(meaning(0x4501, 0), Meaning::Reset);
        assert_eq!(meaning(0x4500, 0x01), Meaning::Reset);
        assert_eq!(
            meaning(0x4500, 0),
            Meaning::Other,
            "config reset keeps users"
        );
        assert_eq!(meaning(0x4503, 0), Meaning::Other);
        assert_eq!(meaning(0x1000, 0x06), Meaning::Other);
    }

    #[test]
    fn names_read_like_the_examples() {
        assert_eq!(name(0x2000, 0), "User enrollment success");
        assert_eq!(name(0x4502, 0), "Factory reset");
        assert_eq!(name(0x4500, 0x02), "Factory reset");
        assert_eq!(name(0x1900, 0x01), "Access denied (sub-code 0x01)");
        assert_eq!(name(0xBEEF, 1), "Event 0xBEEF/01");
        // Not "User update failure" (0x2300, its low 16 bits).
        assert_eq!(name(0x1_2345, 0), "Event 0x12345/00");
        assert!(is_user_event(0x2600) && !is_user_event(0x1000));
    }
}
