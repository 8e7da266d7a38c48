# The operator image: a static-enough release build on Debian, run on
# distroless (glibc, CA certificates, no shell) as the non-root user 65532,
# which is what the Helm chart's securityContext expects.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src src
# Cargo.toml names the benchmarks; their sources must exist for it to load.
COPY benches benches
RUN cargo build --release --locked --bin nixops-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/nixops-operator /usr/local/bin/nixops-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/nixops-operator"]
CMD ["run"]
