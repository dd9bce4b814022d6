package b4serve.v2;

import com.google.gson.JsonObject;
import java.io.IOException;
import java.util.List;
import java.util.Map;
import java.util.function.BooleanSupplier;
import java.util.function.Consumer;
import org.pytorch.serve.util.TokenAuthorization;
import org.pytorch.serve.util.TokenAuthorization.TokenType;

/** The v2 listener's {@link Backend}: TorchServe's model registry, job queues and keys. */
final class TorchServeBackend implements Backend {

    /**
     * Token authorization, when TorchServe's is on, takes TorchServe's inference key, so clients
     * renew keys the same way.
     */
    @Override
    public boolean authorized(String authorization) {
        if (!TokenAuthorization.isEnabled()) {
            return true;
        }
        if (authorization == null) {
            return false;
        }
        String token = TokenAuthorization.parseTokenFromBearerTokenHeader(authorization);
        return TokenAuthorization.checkTokenAuthorization(token, TokenType.INFERENCE);
    }

    /** TorchServe's own answer to a missing, wrong or expired key (400 InvalidKeyException). */
    @Override
    public V2Api.Reply refusedKey() {
        String message =
                "Token Authorization failed. Token either incorrect, expired, or not provided"
                        + " correctly";
        JsonObject body = new JsonObject();
        body.addProperty("error", message);
        body.addProperty("code", 400);
        body.addProperty("type", "InvalidKeyException");
        body.addProperty("message", message);
        return V2Api.Reply.json(400, body);
    }

    @Override
    public V2Api.Reply get(List<String> below, String path) throws IOException {
        return V2Api.get(below, path);
    }

    @Override
    public long infer(
            V2Api.ModelPath target,
            Map<String, String> headers,
            byte[] body,
            String requestId,
            BooleanSupplier waiting,
            Consumer<V2Api.Reply> answer) {
        return V2Api.infer(target, headers, body, requestId, waiting, answer);
    }
}
