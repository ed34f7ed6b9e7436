// The wire constants the dashboard shares with the server.
// Generated from server/wire.py by `python -m server.wire`: do not edit it, change
// server/wire.py and run that again (tests/test_wire.py checks it is up to date).
export const PROTOCOL_VERSION = 1;
export const TICK_TYPES = Object.freeze(["trade","quote"]);
export const TICK_FIELDS = Object.freeze({"trade":["type","sym","seq","ts","price","size","side","venue","trade_id","recv_ts"],"quote":["type","sym","seq","ts","bid","bid_size","ask","ask_size","crossed","venue","recv_ts"]});
export const CLOSE_CODES = Object.freeze({"BAD_REQUEST":4000,"UNAUTHORIZED":4001,"AUTH_TIMEOUT":4002,"FORBIDDEN":4003,"KEY_REVOKED":4004,"SLOW_CONSUMER":4008,"RATE_LIMITED":4029,"CONNECTION_LIMIT":4030,"INTERNAL_ERROR":1011});
export const FINAL_CLOSE_CODES = Object.freeze([4000,4001,4003,4004]);
export const KEY_REFUSED = Object.freeze({"4001":"key rejected","4003":"key not allowed here","4004":"key revoked"});
export const RETRIED_ERRORS = Object.freeze(["connection_limit","internal_error","rate_limited","shutdown","slow_consumer","unavailable"]);
