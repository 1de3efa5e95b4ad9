package io.onramp.flink;

import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.ScalarFunction;

import java.nio.charset.StandardCharsets;

/**
 * {@code onramp_routing_key(payload BYTES) -> STRING}: the user id of a single-object encoded OnboardingEvent,
 * read off the wire without decoding the record; "" when the payload is too broken to tell.
 *
 * <p>Why in Java: a Python key selector is a Python operator of its own in front of the shuffle, and in thread
 * mode its thread competes with the keyed operator's for the GIL. Computed here, in the SQL that reads Kafka, the
 * key costs no Python at all and the job keeps a single Python operator.
 *
 * <p>Must agree byte for byte with {@code udfs/wire_peek.py}: after the 10-byte header (C3 01 + 8-byte schema
 * fingerprint) come {@code event_id} and {@code user_id}, each an Avro string (zig-zag varint length + UTF-8).
 * The shared test vectors in {@code tests/test_wire_peek.py} run through both.
 */
public class RoutingKey extends ScalarFunction {

    private static final int HEADER_LEN = 10;

    @Override
    public void open(FunctionContext context) {}

    public @DataTypeHint("STRING NOT NULL") String eval(byte[] payload) {
        if (payload == null || payload.length < HEADER_LEN || (payload[0] & 0xFF) != 0xC3 || payload[1] != 0x01) {
            return "";
        }
        int pos = HEADER_LEN;
        for (int field = 0; field < 2; field++) {
            long value = 0;
            int shift = 0;
            while (true) {
                if (pos >= payload.length || shift > 63) {
                    return "";
                }
                int b = payload[pos++] & 0xFF;
                value |= (long) (b & 0x7F) << shift;
                shift += 7;
                if ((b & 0x80) == 0) {
                    break;
                }
            }
            long length = (value >>> 1) ^ -(value & 1);
            if (length < 0 || pos + length > payload.length) {
                return "";
            }
            if (field == 1) {
                return new String(payload, pos, (int) length, StandardCharsets.UTF_8);
            }
            pos += (int) length;
        }
        return "";
    }
}
