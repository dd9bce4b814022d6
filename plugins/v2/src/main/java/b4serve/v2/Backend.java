package b4serve.v2;

import java.io.IOException;
import java.util.List;
import java.util.Map;
import java.util.function.BooleanSupplier;
import java.util.function.Consumer;

/** What the v2 listener asks of the model server: TorchServe's registry in production. */
interface Backend {

    /** Whether the request's Authorization header passes (true when authorization is off). */
    boolean authorized(String authorization);

    /** TorchServe's answer to a missing, wrong or expired key. */
    V2Api.Reply refusedKey();

    /** GET below /v2 (health, metadata), answered now. */
    V2Api.Reply get(List<String> below, String path) throws IOException;

    /**
     * Queues a prediction. Its reply goes to {@code answer} once, from any thread (at once when
     * it is refused). Returns how long to wait for that reply before answering 504.
     *
     * @param waiting false once the client hung up: its job is then dropped where TorchServe
     *     lets it be (see {@link WatchedInput})
     */
    long infer(
            V2Api.ModelPath target,
            Map<String, String> headers,
            byte[] body,
            String requestId,
            BooleanSupplier waiting,
            Consumer<V2Api.Reply> answer);
}
