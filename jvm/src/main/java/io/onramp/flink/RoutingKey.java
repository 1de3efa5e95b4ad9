package io.onramp.flink;

import org.apache.flink.table.annotation.DataTypeHint;
import org.apache.flink.table.functions.FunctionContext;
import org.apache.flink.table.functions.ScalarFunction;

import javax.crypto.Mac;
import javax.crypto.spec.SecretKeySpec;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;

/**
 * {@code onramp_routing_key(payload BYTES) -> STRING}: the pseudonym of the user id of a single-object encoded
 * OnboardingEvent (or of its anonymous id when it has no user id), read off the wire without decoding the record;
 * "" when the payload is too broken to tell or names neither.
 *
 * <p>Why in Java: a Python key selector is a Python operator of its own in front of the shuffle, and in thread
 * mode its thread competes with the keyed operator's for the GIL. Computed here, in the SQL that reads Kafka, the
 * key costs no Python at all and the job keeps a single Python operator.
 *
 * <p>Why a pseudonym: keyed state (and every checkpoint) stores the key, and raw ids must never reach state.
 * {@code hex(HMAC-SHA256(key, "user:" + user_id))[:32]}, or {@code "anon:" + anonymous_id}; the key is the text of
 * the {@code ONRAMP_PSEUDONYM_KEY} environment variable of the TaskManager, else the content of the file named by
 * the job parameter {@code onramp.pseudonym-key-file}, trimmed. It is never logged.
 *
 * <p>Must agree byte for byte with {@code udfs/wire_peek.py} and {@code udfs/pseudonym.py}: after the 10-byte
 * header (C3 01 + 8-byte schema fingerprint) come {@code event_id} and {@code user_id}, each an Avro string
 * (zig-zag varint length + UTF-8), then {@code anonymous_id}, a ["null", "string"] union. The shared test vectors
 * in {@code tests/test_minicluster.py} run through both.
 */
public class RoutingKey extends ScalarFunction {

    public static final String KEY_ENV = "ONRAMP_PSEUDONYM_KEY";
    public static final String KEY_FILE_PARAMETER = "onramp.pseudonym-key-file";
    private static final int HEADER_LEN = 10;
    private static final int MIN_KEY_LENGTH = 32;
    private static final int PSEUDONYM_BYTES = 16;
    private static final char[] HEX = "0123456789abcdef".toCharArray();
    private static final byte[] USER = "user:".getBytes(StandardCharsets.UTF_8);
    private static final byte[] ANON = "anon:".getBytes(StandardCharsets.UTF_8);

    private transient Mac mac;
    private transient int pos;

    @Override
    public void open(FunctionContext context) throws Exception {
        String secret = System.getenv(KEY_ENV);
        String source = "$" + KEY_ENV;
        if (secret == null || secret.trim().isEmpty()) {
            String file = context.getJobParameter(KEY_FILE_PARAMETER, "");
            if (file.isEmpty()) {
                throw new IllegalStateException("no pseudonymization key: set " + KEY_ENV
                        + " for the TaskManager or the job parameter " + KEY_FILE_PARAMETER);
            }
            try {
                secret = new String(Files.readAllBytes(Path.of(file)), StandardCharsets.UTF_8);
            } catch (IOException e) {
                throw new IllegalStateException("cannot read the pseudonymization key file " + file
                        + " on this TaskManager (" + e + "); create it with `onramp privacy new-key`", e);
            }
            source = file;
        }
        secret = secret.strip();
        if (secret.length() < MIN_KEY_LENGTH) {
            throw new IllegalStateException("pseudonymization key from " + source + " is shorter than "
                    + MIN_KEY_LENGTH + " characters");
        }
        mac = newMac(secret.getBytes(StandardCharsets.UTF_8));
    }

    static Mac newMac(byte[] secret) throws GeneralSecurityException {
        Mac m = Mac.getInstance("HmacSHA256");
        m.init(new SecretKeySpec(secret, "HmacSHA256"));
        return m;
    }

    public @DataTypeHint("STRING NOT NULL") String eval(byte[] payload) {
        if (payload == null || payload.length < HEADER_LEN || (payload[0] & 0xFF) != 0xC3 || payload[1] != 0x01) {
            return "";
        }
        pos = HEADER_LEN;
        if (skipString(payload) < 0) {            // event_id
            return "";
        }
        int userLength = skipString(payload);     // user_id
        if (userLength < 0) {
            return "";
        }
        if (userLength > 0) {
            return pseudonym(USER, payload, userLength);
        }
        long branch = varint(payload);            // anonymous_id: ["null", "string"]
        if (branch != 1) {
            return "";
        }
        int anonLength = skipString(payload);
        if (anonLength <= 0) {
            return "";
        }
        return pseudonym(ANON, payload, anonLength);
    }

    /** The zig-zag varint at {@code pos}, advancing it; -1 when it runs past the payload or overflows. */
    private long varint(byte[] payload) {
        long value = 0;
        int shift = 0;
        while (true) {
            if (pos >= payload.length || shift > 63) {
                return -1;
            }
            int b = payload[pos++] & 0xFF;
            value |= (long) (b & 0x7F) << shift;
            shift += 7;
            if ((b & 0x80) == 0) {
                return (value >>> 1) ^ -(value & 1);
            }
        }
    }

    /** Skip an Avro string at {@code pos}: its byte length (its bytes end at the new {@code pos}), or -1 when broken. */
    private int skipString(byte[] payload) {
        long length = varint(payload);
        if (length < 0 || pos + length > payload.length) {
            return -1;
        }
        pos += (int) length;
        return (int) length;
    }

    /** The pseudonym of the {@code length} bytes that end at {@code pos}. */
    private String pseudonym(byte[] kind, byte[] payload, int length) {
        int start = pos - length;
        if (!validUtf8(payload, start, length)) {
            return "";  // the Python twin cannot decode it either: broken record, dead-lettered downstream
        }
        mac.update(kind);
        mac.update(payload, start, length);
        byte[] digest = mac.doFinal();
        char[] out = new char[PSEUDONYM_BYTES * 2];
        for (int i = 0; i < PSEUDONYM_BYTES; i++) {
            out[2 * i] = HEX[(digest[i] >> 4) & 0xF];
            out[2 * i + 1] = HEX[digest[i] & 0xF];
        }
        return new String(out);
    }

    private static boolean validUtf8(byte[] payload, int start, int length) {
        try {
            StandardCharsets.UTF_8.newDecoder().decode(java.nio.ByteBuffer.wrap(payload, start, length));
            return true;
        } catch (java.nio.charset.CharacterCodingException e) {
            return false;
        }
    }
}
