package b4serve.v2;

import io.netty.handler.codec.http.QueryStringDecoder;
import java.io.IOException;
import org.pytorch.serve.servingsdk.Context;
import org.pytorch.serve.servingsdk.ModelServerEndpoint;
import org.pytorch.serve.servingsdk.annotations.Endpoint;
import org.pytorch.serve.servingsdk.annotations.helpers.EndpointTypes;
import org.pytorch.serve.servingsdk.http.Request;
import org.pytorch.serve.servingsdk.http.Response;

/**
 * The plugin's entry point: loading it starts the v2 listener ({@link V2Listener}), and it
 * answers the v2 health and metadata routes on TorchServe's own inference port as {@code
 * /oip/...} (GET only).
 *
 * <p>Why not {@code /v2/...} on TorchServe's port: TorchServe 0.12 routes only {@code POST
 * /v2/models/{m}/infer} there (and, with ts_open_inference_protocol, /v2 and /v2/health/*,
 * whose "ready" is always true). A plugin owns a whole first path segment and is asked before
 * TorchServe's own routes, so one owning "v2" would take infer too, and TorchServe releases a
 * request's body before a plugin's code runs (IllegalReferenceCountException): infer cannot go
 * through a plugin endpoint. Hence a listener of our own, which reads bodies itself.
 *
 * <p>TorchServe gives plugins no start hook, only endpoints: it instantiates this class (twice)
 * when it starts, before it serves, which is when the listener starts (once).
 */
@Endpoint(
        urlPattern = "oip",
        endpointType = EndpointTypes.INFERENCE,
        description = "Open Inference Protocol (KServe v2) health and metadata, as /oip/...")
public class OpenInferenceEndpoint extends ModelServerEndpoint {

    public OpenInferenceEndpoint() {
        super();
        V2Listener.startOnce();
    }

    @Override
    public void doGet(Request req, Response rsp, Context ctx) throws IOException {
        String path = new QueryStringDecoder(req.getRequestURI()).path();
        send(rsp, V2Api.get(V2Api.below(path), path));
    }

    @Override
    public void doPost(Request req, Response rsp, Context ctx) throws IOException {
        V2Api.Reply reply =
                V2Api.Reply.error(
                        405,
                        "POST infer to /v2/models/{name}/infer (TorchServe's own route, or the v2"
                                + " listener's); /oip/... answers GET only");
        reply.headers.put("Allow", "GET");
        send(rsp, reply);
    }

    private static void send(Response rsp, V2Api.Reply reply) throws IOException {
        rsp.setStatus(reply.status);
        rsp.setContentType(reply.contentType);
        reply.headers.forEach(rsp::setHeader);
        rsp.getOutputStream().write(reply.body);
    }
}
