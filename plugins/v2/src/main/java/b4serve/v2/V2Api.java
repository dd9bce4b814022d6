package b4serve.v2;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParseException;
import com.google.gson.JsonParser;
import java.io.File;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.function.BooleanSupplier;
import java.util.function.Consumer;
import org.pytorch.serve.archive.model.ModelNotFoundException;
import org.pytorch.serve.archive.model.ModelVersionNotFoundException;
import org.pytorch.serve.metrics.IMetric;
import org.pytorch.serve.metrics.MetricCache;
import org.pytorch.serve.util.ApiUtils;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.messages.InputParameter;
import org.pytorch.serve.wlm.Model;
import org.pytorch.serve.wlm.ModelManager;
import org.pytorch.serve.wlm.WorkerState;
import org.pytorch.serve.wlm.WorkerThread;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The Open Inference Protocol (KServe v2) REST API over TorchServe's model registry, whatever
 * HTTP server carries it: paths below {@code /v2} in, a {@link Reply} out.
 *
 * <p>Infer queues the request for the model exactly as TorchServe's own REST routes do
 * ({@link ForwardedJob}): it shares batches with every other request, and the handler gets the
 * same body and headers (the binary-data extension's among them).
 */
final class V2Api {

    /** Written into the archive by b4serve (b4serve/serving/protocol.py, METADATA_FILE). */
    static final String METADATA_FILE = "v2_metadata.json";

    static final String BINARY_HEADER = "Inference-Header-Content-Length";

    private static final Logger log = LoggerFactory.getLogger(V2Api.class);

    private V2Api() {}

    /** One answer: status, content type, extra headers, body. */
    static final class Reply {
        final int status;
        final String contentType;
        final Map<String, String> headers;
        final byte[] body;

        Reply(int status, String contentType, Map<String, String> headers, byte[] body) {
            this.status = status;
            this.contentType = contentType;
            this.headers = headers == null ? new HashMap<>() : new HashMap<>(headers);
            this.body = body == null ? new byte[0] : body;
        }

        static Reply json(int status, JsonObject body) {
            return new Reply(
                    status, "application/json", null, body.toString().getBytes(StandardCharsets.UTF_8));
        }

        /** KServe's error object ({"error": ...}), which v2 clients read, with our fields. */
        static Reply error(int status, String message) {
            JsonObject body = new JsonObject();
            body.addProperty("error", message);
            body.addProperty("code", status);
            body.addProperty("message", message);
            return json(status, body);
        }

        /** 405 for a path that takes only {@code allowed} (its Allow header). */
        static Reply notAllowed(String method, String allowed, String path) {
            Reply reply =
                    error(405, method + " is not allowed on " + path + ": it takes " + allowed);
            reply.headers.put("Allow", allowed);
            return reply;
        }
    }

    /** models/{name}[/versions/{version}][/{action}] below /v2; null for any other path. */
    static final class ModelPath {
        final String name;
        final String version; // null: the default version
        final String action; // "", "ready" or "infer"

        private ModelPath(String name, String version, String action) {
            this.name = name;
            this.version = version;
            this.action = action;
        }

        static ModelPath parse(List<String> path) {
            if (path.size() < 2 || !"models".equals(path.get(0))) {
                return null;
            }
            List<String> rest = path.subList(2, path.size());
            String version = null;
            if (rest.size() >= 2 && "versions".equals(rest.get(0))) {
                version = rest.get(1);
                rest = rest.subList(2, rest.size());
            }
            if (rest.isEmpty()) {
                return new ModelPath(path.get(1), version, "");
            }
            if (rest.size() == 1 && ("ready".equals(rest.get(0)) || "infer".equals(rest.get(0)))) {
                return new ModelPath(path.get(1), version, rest.get(0));
            }
            return null;
        }
    }

    /** The path's segments below its first one ("/v2/models/b4/ready" -> [models, b4, ready]). */
    static List<String> below(String path) {
        List<String> parts = new ArrayList<>();
        for (String part : path.split("/")) {
            if (!part.isEmpty()) {
                parts.add(part);
            }
        }
        return parts.subList(Math.min(1, parts.size()), parts.size());
    }

    /** GET: server metadata, live, ready; model metadata and ready. */
    static Reply get(List<String> path, String shown) throws IOException {
        ModelPath target = ModelPath.parse(path);
        if (path.isEmpty()) {
            return Reply.json(200, serverMetadata());
        } else if (path.equals(Arrays.asList("health", "live"))) {
            JsonObject live = new JsonObject(); // the server answered: it is live
            live.addProperty("live", true);
            return Reply.json(200, live);
        } else if (path.equals(Arrays.asList("health", "ready"))) {
            return serverReady();
        } else if (target == null) {
            return notFound(shown);
        } else if (target.action.isEmpty()) {
            return modelMetadata(target);
        } else if ("ready".equals(target.action)) {
            return modelReady(target);
        }
        return Reply.notAllowed("GET", "POST", "/v2/" + String.join("/", path));
    }

    static Reply notFound(String shown) {
        return Reply.error(
                404,
                "no v2 endpoint at "
                        + shown
                        + ": see /v2, /v2/health/{live,ready},"
                        + " /v2/models/{name}[/versions/{v}][/ready|/infer]");
    }

    private static JsonObject serverMetadata() {
        JsonObject metadata = new JsonObject();
        metadata.addProperty("name", "torchserve");
        metadata.addProperty("version", ConfigManager.getInstance().getVersion());
        JsonArray extensions = new JsonArray();
        extensions.add("binary_tensor_data");
        metadata.add("extensions", extensions);
        return metadata;
    }

    /** Ready when a model is registered and every default version has its workers READY. */
    private static Reply serverReady() {
        Map<String, Model> models = ModelManager.getInstance().getDefaultModels();
        List<String> waiting = new ArrayList<>();
        for (Model model : models.values()) {
            if (!isReady(model)) {
                waiting.add(model.getModelName() + " " + model.getVersion());
            }
        }
        boolean ready = !models.isEmpty() && waiting.isEmpty();
        JsonObject body = new JsonObject();
        body.addProperty("ready", ready);
        if (models.isEmpty()) {
            body.addProperty("error", "no model is registered yet");
        } else if (!ready) {
            body.addProperty("error", "no READY worker yet for: " + String.join(", ", waiting));
        }
        return Reply.json(ready ? 200 : 503, body);
    }

    private static Reply modelReady(ModelPath target) {
        Model model = find(target);
        if (model == null) {
            return missing(target);
        }
        boolean ready = isReady(model);
        JsonObject body = new JsonObject();
        body.addProperty("name", model.getModelName());
        body.addProperty("version", model.getVersion());
        body.addProperty("ready", ready);
        if (!ready) {
            body.addProperty(
                    "error",
                    String.format(
                            "model %s %s has %d of %d workers READY",
                            model.getModelName(),
                            model.getVersion(),
                            readyWorkers(model),
                            workersNeeded(model)));
        }
        return Reply.json(ready ? 200 : 503, body);
    }

    private static Reply modelMetadata(ModelPath target) throws IOException {
        Model model = find(target);
        if (model == null) {
            return missing(target);
        }
        JsonObject metadata = new JsonObject();
        metadata.addProperty("name", model.getModelName());
        JsonArray versions = new JsonArray();
        try {
            for (Map.Entry<String, Model> entry :
                    ModelManager.getInstance().getAllModelVersions(model.getModelName())) {
                versions.add(entry.getKey());
            }
        } catch (ModelNotFoundException e) {
            versions.add(model.getVersion()); // unregistered meanwhile: the one described
        }
        metadata.add("versions", versions);
        JsonObject declared = declaredMetadata(model);
        metadata.addProperty(
                "platform", declared.has("platform") ? declared.get("platform").getAsString() : "");
        // empty lists for an archive that declares none, as TorchServe's gRPC ModelMetadata
        metadata.add("inputs", declared.has("inputs") ? declared.get("inputs") : new JsonArray());
        metadata.add("outputs", declared.has("outputs") ? declared.get("outputs") : new JsonArray());
        return Reply.json(200, metadata);
    }

    private static JsonObject declaredMetadata(Model model) throws IOException {
        File file = new File(model.getModelDir(), METADATA_FILE);
        if (!file.isFile()) {
            return new JsonObject();
        }
        try {
            JsonElement parsed =
                    JsonParser.parseString(
                            new String(Files.readAllBytes(file.toPath()), StandardCharsets.UTF_8));
            return parsed.isJsonObject() ? parsed.getAsJsonObject() : new JsonObject();
        } catch (JsonParseException e) {
            throw new IOException(file + " is not valid JSON: " + e.getMessage(), e);
        }
    }

    static boolean isReady(Model model) {
        return readyWorkers(model) >= workersNeeded(model);
    }

    /** At least one: a version scaled to zero workers answers nothing. */
    private static int workersNeeded(Model model) {
        return Math.max(1, model.getMinWorkers());
    }

    private static int readyWorkers(Model model) {
        int ready = 0;
        for (WorkerThread worker :
                ModelManager.getInstance().getWorkers(model.getModelVersionName())) {
            if (worker.getState() == WorkerState.WORKER_MODEL_LOADED) {
                ready++;
            }
        }
        return ready;
    }

    /**
     * POST infer: the request queued for the model (its default or named version); its reply,
     * what the worker answered, goes to {@code answer}. Returns how long to wait for it.
     */
    static long infer(
            ModelPath target,
            Map<String, String> headers,
            byte[] body,
            String requestId,
            BooleanSupplier waiting,
            Consumer<Reply> answer) {
        Model model = find(target);
        if (model == null) {
            answer.accept(missing(target));
            return 0;
        }
        String envelope = ConfigManager.getInstance().getTsServiceEnvelope();
        if (envelope != null && !envelope.isEmpty() && !isJson(headers, body)) {
            // TorchServe's kserve/kservev2 envelopes json-decode every body in the worker: a
            // binary one would die there as a 503 with a UnicodeDecodeError traceback.
            answer.accept(
                    Reply.error(
                            415,
                            "this server runs TorchServe's "
                                    + envelope
                                    + " envelope, which reads JSON bodies only: send the v2"
                                    + " request as JSON (tritonclient: binary_data=False on each"
                                    + " InferInput and requested output), or serve without"
                                    + " service_envelope"));
            return 0;
        }
        WatchedInput input = new WatchedInput(requestId, waiting);
        for (Map.Entry<String, String> header : headers.entrySet()) {
            input.updateHeaders(header.getKey(), header.getValue());
        }
        input.addParameter(
                new InputParameter("body", body, headerValue(headers, "Content-Type")));
        input.setClientExpireTS(model.getClientTimeoutInMills());
        countRequest(model.getModelName(), target.version);
        ForwardedJob job =
                new ForwardedJob(model.getModelName(), target.version, input, waiting, answer);
        try {
            if (!ModelManager.getInstance().addJob(job)) {
                answer.accept(
                        Reply.error(
                                503,
                                ApiUtils.getStreamingInferenceErrorResponseMessage(
                                        model.getModelName(), target.version)));
                return 0;
            }
        } catch (ModelNotFoundException | ModelVersionNotFoundException e) {
            answer.accept(missing(target)); // unregistered meanwhile
            return 0;
        }
        return answerTimeoutMillis(model);
    }

    /**
     * What the client sees of a reply: a success as the worker wrote it; an error as an Open
     * Inference Protocol error object ({@code {"error": ...}}, the worker's own fields kept); a
     * server error without its internal detail, which goes to the log with the request id.
     */
    static Reply forClient(Reply reply, String requestId) {
        if (reply.status < 400) {
            return reply;
        }
        String text = new String(reply.body, StandardCharsets.UTF_8);
        if (reply.status == 500) {
            log.error("v2 request {} failed: {}", requestId, text);
            return Reply.error(500, "internal error: the server log has request " + requestId);
        }
        JsonObject body = parsedObject(text);
        if (body == null) {
            body = new JsonObject();
            body.addProperty("message", text);
        }
        if (!body.has("error") || !body.get("error").isJsonPrimitive()) {
            String message = body.has("message") ? body.get("message").getAsString() : text;
            body.addProperty("error", message.isEmpty() ? "HTTP " + reply.status : message);
        }
        Reply shaped = Reply.json(reply.status, body);
        shaped.headers.putAll(reply.headers);
        shaped.headers.remove("Content-Type");
        return shaped;
    }

    private static JsonObject parsedObject(String text) {
        try {
            JsonElement parsed = JsonParser.parseString(text);
            return parsed.isJsonObject() ? parsed.getAsJsonObject() : null;
        } catch (JsonParseException | IllegalStateException e) {
            return null;
        }
    }

    private static String headerValue(Map<String, String> headers, String name) {
        for (Map.Entry<String, String> header : headers.entrySet()) {
            if (header.getKey().equalsIgnoreCase(name)) {
                return header.getValue();
            }
        }
        return null;
    }

    /**
     * TorchServe bounds each batch by the model's response timeout and fails a stuck one itself;
     * this only keeps a lost job from holding its connection forever.
     */
    private static long answerTimeoutMillis(Model model) {
        long client = model.getClientTimeoutInMills();
        long batches = 10L * Math.max(1, model.getResponseTimeout()) * 1000L;
        return client > 0 ? Math.min(client, batches) : batches;
    }

    private static boolean isJson(Map<String, String> headers, byte[] body) {
        for (String name : headers.keySet()) {
            if (BINARY_HEADER.equalsIgnoreCase(name)) {
                return false;
            }
        }
        for (byte b : body) {
            if (b != ' ' && b != '\n' && b != '\r' && b != '\t') {
                return b == '{';
            }
        }
        return false;
    }

    /** As TorchServe's own inference routes count requests (ts_inference_requests_total). */
    private static void countRequest(String modelName, String version) {
        IMetric metric = MetricCache.getInstance().getMetricFrontend("ts_inference_requests_total");
        if (metric != null) {
            metric.addOrUpdate(
                    Arrays.asList(
                            modelName,
                            version == null ? "default" : version,
                            ConfigManager.getInstance().getHostName()),
                    1);
        }
    }

    private static Model find(ModelPath target) {
        try {
            return ModelManager.getInstance().getModel(target.name, target.version);
        } catch (ModelVersionNotFoundException e) {
            return null;
        }
    }

    private static Reply missing(ModelPath target) {
        String what = target.version == null ? "" : " version " + target.version;
        return Reply.error(404, "model " + target.name + what + " is not registered");
    }
}
