// Asks a Kafka cluster whether it serves clients, the way dlpipe will use it, and prints the
// nodes it answers with. `scripts/kafka` uses it to tell "ready" apart from "something listens on
// the port". Run with Java's single-file source launcher:
//   java -cp 'libs/*' Probe.java BOOTSTRAP TIMEOUT_MS [metadata|ready|replicated]
//
//   metadata  the cluster answers a metadata request (DescribeCluster).
//   ready     also: the group coordinator answers (FindCoordinator + OffsetFetch of a group, what
//             `dlpipe run` does first) and the transaction coordinator hands out a producer id
//             (what idempotent and transactional producers do first). A broker that has just
//             started answers metadata seconds before it has loaded its coordinators.
//   replicated  also: every partition of every topic (the internal ones too) has a leader and
//             all its replicas in sync. A restarted broker of a cluster serves clients before it
//             has caught up; a rolling restart waits for this before it stops the next broker,
//             or partitions would drop below min.insync.replicas.
//
// DLPIPE_KAFKA_PROPERTIES may name a file of client properties in librdkafka's names, the same
// keys as dlpipe's [kafka.properties] (security.protocol, sasl.mechanism, sasl.username,
// sasl.password, ssl.ca.location, ...), with ${ENV} references; they are translated to the Java
// client's names here, so one set of properties serves dlpipe, the scripts and the tests.
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.TimeUnit;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterResult;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.common.Node;
import org.apache.kafka.common.serialization.ByteArraySerializer;

public class Probe {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        int timeoutMs = Integer.parseInt(args[1]);
        String mode = args.length > 2 ? args[2] : "metadata";
        boolean ready = mode.equals("ready") || mode.equals("replicated");
        Properties props = clientProperties(System.getenv("DLPIPE_KAFKA_PROPERTIES"));
        props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, timeoutMs);
        props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, timeoutMs);
        String step = "metadata";
        try (Admin admin = Admin.create(props)) {
            DescribeClusterResult cluster = admin.describeCluster();
            String id = cluster.clusterId().get(timeoutMs, TimeUnit.MILLISECONDS);
            StringBuilder nodes = new StringBuilder();
            for (Node node : cluster.nodes().get(timeoutMs, TimeUnit.MILLISECONDS)) {
                if (nodes.length() > 0) nodes.append(',');
                nodes.append(node.host()).append(':').append(node.port());
            }
            String readiness = "";
            if (ready) {
                step = "the group coordinator";
                admin.listConsumerGroupOffsets("dlpipe-probe").partitionsToOffsetAndMetadata()
                    .get(timeoutMs, TimeUnit.MILLISECONDS);
                step = "the transaction coordinator";
                Properties producerProps = new Properties();
                producerProps.putAll(props);
                producerProps.remove(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG);
                // A new transactional id needs a new producer id, as every idempotent producer
                // does: a known one would only bump its epoch and prove less.
                producerProps.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, "dlpipe-probe-" + java.util.UUID.randomUUID());
                producerProps.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, timeoutMs);
                try (KafkaProducer<byte[], byte[]> producer =
                         new KafkaProducer<>(producerProps, new ByteArraySerializer(), new ByteArraySerializer())) {
                    producer.initTransactions();
                }
                readiness = ", coordinators ready";
            }
            if (mode.equals("replicated")) {
                step = "the replicas";
                readiness += ", " + replicated(admin, timeoutMs);
            }
            System.out.println("cluster " + id + " nodes " + nodes + readiness);
        } catch (Exception e) {
            System.err.println("no answer from " + bootstrap + " (" + step + "): " + e);
            System.exit(1);
        }
    }

    // How many partitions there are, or an exception naming one without a leader or with a
    // replica out of sync.
    static String replicated(Admin admin, int timeoutMs) throws Exception {
        var listing = new org.apache.kafka.clients.admin.ListTopicsOptions().listInternal(true);
        var names = admin.listTopics(listing).names().get(timeoutMs, TimeUnit.MILLISECONDS);
        int partitions = 0;
        for (var topic : admin.describeTopics(names).allTopicNames().get(timeoutMs, TimeUnit.MILLISECONDS).values()) {
            for (var p : topic.partitions()) {
                if (p.leader() == null || p.leader().isEmpty() || p.isr().size() < p.replicas().size()) {
                    throw new IllegalStateException(topic.name() + "-" + p.partition() + " has leader "
                        + p.leader() + ", " + p.isr().size() + " of " + p.replicas().size() + " replicas in sync");
                }
                partitions++;
            }
        }
        return partitions + " partitions fully replicated";
    }

    // librdkafka's property names to the Java client's.
    static Properties clientProperties(String file) throws Exception {
        Properties out = new Properties();
        Properties in = new Properties();
        if (file != null && !file.isEmpty()) {
            try (var reader = Files.newBufferedReader(Path.of(file))) {
                in.load(reader);
            }
        }
        Map<String, String> env = System.getenv();
        Properties p = new Properties();
        for (String key : in.stringPropertyNames()) p.put(key, expand(in.getProperty(key), env));
        // As in dlpipe: DLPIPE_KAFKA__SASL_PASSWORD sets sasl.password.
        for (var e : env.entrySet()) {
            if (e.getKey().startsWith("DLPIPE_KAFKA__") && e.getKey().length() > 14) {
                p.put(e.getKey().substring(14).toLowerCase().replace('_', '.'), e.getValue());
            }
        }
        String mechanism = p.getProperty("sasl.mechanism", p.getProperty("sasl.mechanisms"));
        for (String key : p.stringPropertyNames()) {
            String value = p.getProperty(key);
            switch (key) {
                case "security.protocol" -> out.put(key, value.toUpperCase());
                case "sasl.mechanism", "sasl.mechanisms" -> out.put("sasl.mechanism", value);
                case "sasl.username", "sasl.password" -> { }
                case "ssl.ca.location" -> {
                    out.put("ssl.truststore.type", "PEM");
                    out.put("ssl.truststore.location", value);
                }
                case "ssl.endpoint.identification.algorithm" ->
                    out.put(key, value.equalsIgnoreCase("none") ? "" : value);
                default -> System.err.println("probe: property " + key + " has no Java counterpart here; ignored");
            }
        }
        String user = p.getProperty("sasl.username");
        if (user != null && mechanism != null) {
            String module = mechanism.equals("PLAIN") ? "org.apache.kafka.common.security.plain.PlainLoginModule"
                : "org.apache.kafka.common.security.scram.ScramLoginModule";
            out.put("sasl.jaas.config", module + " required username=\"" + quote(user) + "\" password=\""
                + quote(p.getProperty("sasl.password", "")) + "\";");
        }
        return out;
    }

    static String expand(String value, Map<String, String> env) {
        Matcher m = Pattern.compile("\\$\\{([^}]+)\\}").matcher(value);
        StringBuilder sb = new StringBuilder();
        while (m.find()) {
            String v = env.get(m.group(1));
            if (v == null) throw new IllegalArgumentException("environment variable " + m.group(1) + " is not set");
            m.appendReplacement(sb, Matcher.quoteReplacement(v));
        }
        m.appendTail(sb);
        return sb.toString();
    }

    static String quote(String s) {
        return s.replace("\\", "\\\\").replace("\"", "\\\"");
    }
}
